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
    pins = ["encoder.layer.0=cpu"]      # optional; also: dynamic_dims, profiles, objective
    verify = false                      # optional (default true): do not run and check the bundle
                                        # on this host's devices (cross-compiles); calibrate = false:
                                        # price an uncalibrated device by estimates
    tune = "none"                       # optional: none | quick (default) | full
    iree_flags = ["--iree-llvmcpu-enable-ukernels=all"]   # optional: added to every iree-compile
    output = "mypkg/model.pab"          # where the bundle goes inside the built package

At run time the package loads it with `polyarch.runtime.load(importlib.resources.files(
"mypkg") / "model.pab")`, which needs only the runtime (iree-base-runtime + numpy).
A bundle is recompiled only when its model file, a local module the model imports, a
profile, or its options change (the compile's depfile and options are kept in build_temp).
"""

import json
import os
import re
import shutil
import subprocess
import sys

from setuptools.command.build_py import build_py as _build_py

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

KEYS = {"source", "entry", "inputs", "dynamic_dims", "devices", "plans", "pins", "profiles", "objective", "output",
        "verify", "calibrate", "tune", "iree_flags"}


def bundles_of(project_dir):
    """The [[tool.polyarch.bundle]] tables of a project's pyproject.toml, checked."""
    path = os.path.join(project_dir, "pyproject.toml")
    with open(path, "rb") as f:
        tables = tomllib.load(f).get("tool", {}).get("polyarch", {}).get("bundle", [])
    if isinstance(tables, dict):
        tables = [tables]
    for i, t in enumerate(tables):
        unknown = set(t) - KEYS
        if unknown:
            raise ValueError(f"{path}: [[tool.polyarch.bundle]] #{i + 1} has unknown keys {sorted(unknown)}; "
                             f"known: {sorted(KEYS)}")
        for key in ("source", "output"):
            if key not in t:
                raise ValueError(f"{path}: [[tool.polyarch.bundle]] #{i + 1} needs '{key}'")
        if "devices" in t and "plans" in t:
            raise ValueError(f"{path}: [[tool.polyarch.bundle]] #{i + 1}: give devices or plans, not both")
        for key in ("verify", "calibrate"):
            if not isinstance(t.get(key, True), bool):
                raise ValueError(f"{path}: [[tool.polyarch.bundle]] #{i + 1}: '{key}' must be true or false")
        if t.get("tune", "quick") not in ("none", "quick", "full"):
            raise ValueError(f"{path}: [[tool.polyarch.bundle]] #{i + 1}: 'tune' must be \"none\", \"quick\" or \"full\"")
        flags = t.get("iree_flags", [])
        if not isinstance(flags, list) or not all(isinstance(f, str) and f.startswith("-") for f in flags):
            raise ValueError(f"{path}: [[tool.polyarch.bundle]] #{i + 1}: 'iree_flags' must be a list of flags "
                             f"such as [\"--iree-llvmcpu-enable-ukernels=all\"]")
    return tables


def compile_args(table, project_dir, output, depfile):
    """`polyarch compile` arguments for one bundle table."""
    model = os.path.join(project_dir, table["source"])
    if table.get("entry"):
        model += ":" + table["entry"]
    args = ["compile", model, "-o", output, "--depfile", depfile, "-q"]
    for x in table.get("inputs", []):
        args += ["-i", x]
    for x in table.get("dynamic_dims", []):
        args += ["--dynamic-dim", x]
    for x in table.get("devices", []):
        args += ["-d", x]
    for plan in table.get("plans", []):
        args += ["--plans", ",".join(plan) if isinstance(plan, list) else plan]
    for x in table.get("pins", []):
        args += ["--pin", x]
    for x in table.get("profiles", []):
        args += ["--profile", os.path.join(project_dir, x)]
    if table.get("objective"):
        args += ["--objective", table["objective"]]
    if not table.get("verify", True):
        args.append("--no-verify")
    if not table.get("calibrate", True):
        args.append("--no-calibrate")
    if table.get("tune"):
        args += ["--tune", table["tune"]]
    for x in table.get("iree_flags", []):
        args.append(f"--iree-flag={x}")
    return args


def up_to_date(output, depfile, options_file, options):
    """True if `output` exists, was made with these options, and is newer than every dependency."""
    if not (os.path.exists(output) and os.path.exists(depfile) and os.path.exists(options_file)):
        return False
    with open(options_file) as f:
        if json.load(f) != options:
            return False
    with open(depfile) as f:
        text = f.read().replace("\\\n", " ")
    _, _, rest = text.partition(": ")
    deps = [re.sub(r"\\([ #\\])", r"\1", d).replace("$$", "$") for d in re.split(r"(?<!\\)\s+", rest.strip()) if d]
    built = os.path.getmtime(output)
    return all(os.path.exists(d) and os.path.getmtime(d) <= built for d in deps)


def build_bundles(project_dir, build_lib, build_temp, announce=print):
    """Compile (or reuse) every declared bundle and place it under build_lib."""
    for table in bundles_of(project_dir):
        cache = os.path.join(build_temp, "polyarch", table["output"])
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        depfile, options_file = cache + ".d", cache + ".options.json"
        args = compile_args(table, project_dir, cache, depfile)
        if up_to_date(cache, depfile, options_file, args):
            announce(f"polyarch: {table['output']} is up to date")
        else:
            announce(f"polyarch: compiling {table['source']} into {table['output']}")
            r = subprocess.run([sys.executable, "-m", "polyarch.tools.cli", *args], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"polyarch compile failed for {table['source']}:\n{r.stderr.strip()}")
            with open(options_file, "w") as f:
                json.dump(args, f)
        dest = os.path.join(build_lib, table["output"])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(cache, dest)


class build_py(_build_py):
    """setuptools' build_py, then the bundles of [[tool.polyarch.bundle]]."""

    def run(self):
        super().run()
        build_temp = self.get_finalized_command("build").build_temp
        build_bundles(os.path.abspath(os.getcwd()), self.build_lib, build_temp,
                      announce=lambda m: self.announce(m, level=2))
