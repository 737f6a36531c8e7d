"""`not CMD...`: run CMD, succeed only if it fails (LLVM's `not`, for lit tests)."""
import subprocess
import sys

sys.exit(0 if subprocess.call(sys.argv[1:]) != 0 else 1)
