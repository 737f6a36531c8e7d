"""Runs the lit + FileCheck pass tests as part of pytest, so one command runs everything."""

import os
import subprocess
import sys


def test_lit_pass_tests():
    here = os.path.dirname(os.path.abspath(__file__))
    lit = os.path.join(os.path.dirname(sys.executable), "lit")
    r = subprocess.run([lit, "-v", os.path.join(here, "passes")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert "Passed: 3" in r.stdout or "Passed" in r.stdout
