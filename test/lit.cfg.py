# lit configuration for the pass tests: polyarch-opt + FileCheck (the `filecheck` package).
import os
import shutil
import sys

import lit.formats

config.name = "polyarch"
config.test_format = lit.formats.ShTest(execute_external=True)
config.suffixes = [".mlir"]
config.test_source_root = os.path.dirname(__file__)
config.excludes = ["cmake", "Output"]
# The tools live beside the Python that runs lit (the project venv).
bindir = os.path.dirname(sys.executable)
config.environment["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])
config.substitutions.append(("FileCheck", os.path.join(bindir, "filecheck")))
config.substitutions.append(("not ", f"{sys.executable} {os.path.join(config.test_source_root, 'not.py')} "))
