import atexit
import contextlib
import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One measurement cache per test process (profiles calibrated once, ops measured wrong), never
# the user's; removed when the process ends. This file runs twice in a process (as pytest's
# conftest and as `conftest` for the test files' imports): the second time keeps the first's.
# A pytest-xdist worker starts with the profiles its controller measured before the workers
# started (pytest_configure below): measured while the other worker runs tests, a worker's own
# would price its plans by a loaded host.
_OWNER = "POLYARCH_TEST_CACHE_OWNER"
if os.environ.get(_OWNER) != str(os.getpid()):
    _seed = os.environ.get("POLYARCH_CACHE_DIR") if os.environ.get(_OWNER) and os.environ.get("PYTEST_XDIST_WORKER") \
        else None
    os.environ["POLYARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="polyarch-test-cache-")
    os.environ[_OWNER] = str(os.getpid())
    atexit.register(shutil.rmtree, os.environ["POLYARCH_CACHE_DIR"], ignore_errors=True)
    if _seed and os.path.isdir(os.path.join(_seed, "profiles")):
        shutil.copytree(os.path.join(_seed, "profiles"), os.path.join(os.environ["POLYARCH_CACHE_DIR"], "profiles"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from conftest import ...`


def pytest_configure(config):
    """With pytest-xdist workers (-n N), measure this host's devices once here, before they
    start; each copies the profiles into its own cache (above)."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    from polyarch.compiler import measured

    measured.resolve_profiles(["cpu", "vulkan"])


def cli(*args, cwd=None):
    """Run the installed `polyarch` console script, as a user would."""
    import subprocess

    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "polyarch"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=900)


def example(name):
    """Load examples/<name>.py by path, under a unique module name (no sys.path games)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"polyarch_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def minilm():
    ex = example("minilm")

    return ex.build(), ex.example_inputs()


@pytest.fixture(scope="session")
def mlp():
    ex = example("mlp")

    return ex.build(), ex.example_inputs()


@pytest.fixture(scope="session")
def cnn():
    ex = example("cnn")

    return ex.build(), ex.example_inputs()


def eager(model, inputs):
    import torch

    with torch.no_grad():
        return model(*inputs).numpy()


@contextlib.contextmanager
def one_ray_cluster_at_a_time():
    """Held while a test's Ray cluster lives: `ray stop` (how a cluster is ended) ends every Ray
    process of the user, so test files on other pytest-xdist workers wait for each other here."""
    import fcntl

    with open(os.path.join(tempfile.gettempdir(), "polyarch-test-ray.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def enter_loopback_only_network():
    """Move this thread (and what it starts from now on: processes, threads) into a new
    network namespace whose only interface is loopback, up. -> a function that returns the
    thread to the namespace it was in. Raises OSError where that is not allowed (it needs
    CAP_SYS_ADMIN, e.g. root)."""
    import ctypes
    import fcntl
    import socket
    import struct
    import threading

    clone_newnet, siocgifflags, siocsifflags, iff_up = 0x40000000, 0x8913, 0x8914, 0x1
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    if libc.unshare(clone_newnet) != 0:
        err = ctypes.get_errno()
        os.close(home)
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # `ip link set lo up`
        flags = struct.unpack("16sH", fcntl.ioctl(s, siocgifflags, struct.pack("16sH", b"lo", 0))[:18])[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH", b"lo", flags | iff_up))

    def leave():
        if libc.setns(home, clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
        os.close(home)

    return leave
