"""Compile polyarch bundles while building a Python package with setuptools.

A project that ships a model as a bundle declares it in its pyproject.toml; building the
wheel (or sdist install, or editable install) compiles it into the package:

    [build-system]
    requires = ["setuptools>=68", "polyarch[compiler]"]
    build-backend = "setuptools.build_meta"

    [tool.setuptools.cmdclass]
    build_py = "polyarch.tools.setuptools_hook.build_py"

    [[tool.polyarch.bundle]]
    source = "src/mypkg/model.py"      # the model file, relative to pyproject.toml
    entry = "Model"                     # class, factory or nn.Module in it (optional)
    inputs = ["4x64xi64", "4x64xi64"]   # as `polyarch compile --input` (optional)
    devices = ["cpu", "vulkan"]         # or: plans = [["vulkan", "cpu"], ["cpu"]]
    pins = ["encoder.layer.0=cpu"]      # optional; also: dynamic_dims, profiles, objective, solver, jobs
    verify = false                      # optional (default true): do not run and check the bundle
                                        # on this host's devices (cross-compiles); calibrate = false:
                                        # price an uncalibrated device by estimates
    tune = "none"                       # optional: none | quick (default) | full
    iree_flags = ["--iree-llvmcpu-enable-ukernels=all"]   # optional: added to every iree-compile
    output = "mypkg/model.pab"          # where the bundle goes inside the built package

At run time the package loads it with `polyarch.runtime.load(importlib.resources.files(
"mypkg") / "model.pab")`, which needs only the runtime (iree-base-runtime + numpy).
Every key but source, entry, inputs and output is a compile option (compiler/options.py's
CompileOptions, same names), written to a JSON file that `polyarch compile --options` reads.
A bundle is recompiled only when its model file, a local module the model imports, a
profile, or its options change (the compile's depfile and options are kept in build_temp).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING, Callable

from setuptools.command.build_py import build_py as _build_py

if TYPE_CHECKING:
    from ..compiler.options import CompileOptions

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

# Keys of a bundle table beside the compile options (the fields of compiler/options.py's
# CompileOptions, under the same names).
BUNDLE_KEYS = {"source", "entry", "inputs", "output"}


def _option_keys():
    from dataclasses import fields

    from ..compiler.options import CompileOptions

    return {f.name for f in fields(CompileOptions)}


def bundles_of(project_dir: str) -> list:
    """The [[tool.polyarch.bundle]] tables of a project's pyproject.toml, checked (their
    options too)."""
    path = os.path.join(project_dir, "pyproject.toml")
    with open(path, "rb") as f:
        tables = tomllib.load(f).get("tool", {}).get("polyarch", {}).get("bundle", [])
    if isinstance(tables, dict):
        tables = [tables]
    known = BUNDLE_KEYS | _option_keys()
    for i, t in enumerate(tables):
        unknown = set(t) - known
        if unknown:
            raise ValueError(f"{path}: [[tool.polyarch.bundle]] #{i + 1} has unknown keys {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        for key in ("source", "output"):
            if key not in t:
                raise ValueError(f"{path}: [[tool.polyarch.bundle]] #{i + 1} needs '{key}'")
        compile_options(t, project_dir, f"{path}: [[tool.polyarch.bundle]] #{i + 1}")
    return tables


def compile_options(table: dict, project_dir: str, where: str = "[[tool.polyarch.bundle]]") -> "CompileOptions":
    """The CompileOptions of one bundle table (profiles relative to the project); ValueError
    naming the table for a bad one."""
    from ..compiler.options import CompileOptions
    from ..errors import PolyarchError

    opts = {k: v for k, v in table.items() if k not in BUNDLE_KEYS}
    try:
        return CompileOptions.from_json(opts, where, base_dir=project_dir)
    except PolyarchError as e:
        raise ValueError(str(e)) from None


def compile_args(table: dict, project_dir: str, output: str, depfile: str | None, options_file: str | None) -> list:
    """`polyarch compile` arguments for one bundle table whose options are in options_file."""
    model = os.path.join(project_dir, table["source"])
    if table.get("entry"):
        model += ":" + table["entry"]
    args = ["compile", model, "-o", output, "--depfile", depfile, "-q", "--options", options_file]
    for x in table.get("inputs", []):
        args += ["-i", x]
    return args


def up_to_date(output: str, depfile: str | None, record_file: str, record: dict) -> bool:
    """True if `output` exists, was made as `record` says (arguments and options), and is
    newer than every dependency."""
    if not (os.path.exists(output) and os.path.exists(depfile) and os.path.exists(record_file)):
        return False
    with open(record_file) as f:
        if json.load(f) != record:
            return False
    with open(depfile) as f:
        text = f.read().replace("\\\n", " ")
    _, _, rest = text.partition(": ")
    deps = [re.sub(r"\\([ #\\])", r"\1", d).replace("$$", "$") for d in re.split(r"(?<!\\)\s+", rest.strip()) if d]
    built = os.path.getmtime(output)
    return all(os.path.exists(d) and os.path.getmtime(d) <= built for d in deps)


def build_bundles(project_dir: str, build_lib: str, build_temp: str, announce: Callable[[str], None] = print) -> None:
    """Compile (or reuse) every declared bundle and place it under build_lib."""
    for table in bundles_of(project_dir):
        cache = os.path.join(build_temp, "polyarch", table["output"])
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        depfile, options_file, record_file = cache + ".d", cache + ".options.json", cache + ".build.json"
        options = compile_options(table, project_dir)
        args = compile_args(table, project_dir, cache, depfile, options_file)
        record = {"args": args, "options": options.to_json()}
        if up_to_date(cache, depfile, record_file, record):
            announce(f"polyarch: {table['output']} is up to date")
        else:
            announce(f"polyarch: compiling {table['source']} into {table['output']}")
            options.save(options_file)
            r = subprocess.run([sys.executable, "-m", "polyarch.tools.cli", *args], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"polyarch compile failed for {table['source']}:\n{r.stderr.strip()}")
            with open(record_file, "w") as f:
                json.dump(record, f)
        dest = os.path.join(build_lib, table["output"])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(cache, dest)


class build_py(_build_py):
    """setuptools' build_py, then the bundles of [[tool.polyarch.bundle]]."""

    def run(self) -> None:
        super().run()
        build_temp = self.get_finalized_command("build").build_temp
        build_bundles(os.path.abspath(os.getcwd()), self.build_lib, build_temp,
                      announce=lambda m: self.announce(m, level=2))
