"""Files and processes at the edges, one rule for every command (standard library only).

- Every path a command writes is checked before any work starts (`check_outputs`): refused when
  it names an input of the same command, another of its outputs or the bundle being run, and
  when its folder does not take a new file.
- Every write is atomic (`atomic_write`): a temporary file in the same folder (made if missing),
  renamed over the target (the file behind a symbolic link, which stays a link), so a reader
  sees the old file or the new one, and a killed writer leaves the old one.
- Temporary folders (`temp_dir`) hold a lock for as long as their process lives; the first
  temporary folder a process makes removes those whose process has died (SIGKILL included).
- Child processes (`die_with_parent`) get SIGKILL when the thread that started them dies.
- Text from a file the user did not write (a bundle's manifest) is printed escaped (`printable`).
- SIGTERM (and the CLI's Ctrl-C) unwinds as an exception (`unwind`; `terminate_unwinds` for the
  Python API's compiles), so clean-up runs."""

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import sys
import tempfile
from typing import Iterator

from .errors import PolyarchError

__all__ = ["check_outputs", "atomic_write", "real_target", "temp_dir", "sweep_dead_temp", "die_with_parent",
           "printable", "unwind", "terminate_unwinds"]

TEMP_PREFIX = "polyarch-"
LOCK = ".polyarch-lock"


def _same(a: str, b: str) -> bool:
    """Whether two paths name one file (through links, hard links too), existing or not."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def real_target(path: str) -> str:
    """The file a write to `path` must replace: the end of its chain of symbolic links."""
    return os.path.realpath(path) if os.path.islink(path) else path


def check_outputs(outputs: dict, inputs: dict | None = None) -> None:
    """Refuse, before any work, every output (what: path) that names an input (what: path), another
    output, or a place where no new file can be made (a missing folder, a file for a folder, a
    folder for a file, a file system that takes no new file such as /proc)."""
    outputs = {k: os.fspath(v) for k, v in outputs.items() if v is not None}
    inputs = {k: os.fspath(v) for k, v in (inputs or {}).items() if v is not None}
    seen = []
    for what, path in outputs.items():
        for other, src in inputs.items():
            if _same(path, src):
                raise PolyarchError(f"{what} {path} is {other}: writing it would replace that file",
                                    fix=f"write {what} elsewhere")
        for other, dst in seen:
            if _same(path, dst):
                raise PolyarchError(f"{what} {path} is also {other}: one file would replace the other",
                                    fix="give each output its own path")
        seen.append((what, path))
        _check_place(what, path)


def _check_place(what, path):
    target = real_target(path)
    if os.path.isdir(target):
        raise PolyarchError(f"{what} {path} is a folder", fix="give a file name inside it")
    if os.path.exists(target) and not stat.S_ISREG(os.stat(target).st_mode):
        raise PolyarchError(f"{what} {path} is not a regular file (a device, pipe or socket)",
                            fix="write to a regular file")
    folder = os.path.dirname(os.path.abspath(target)) or "."
    fix = "give a path in a folder you can write to"
    while not os.path.isdir(folder):  # missing folders are made when written (atomic_write): check the first that exists
        if os.path.exists(folder):
            raise PolyarchError(f"cannot write {what} {path}: {folder} is a file, not a folder", fix=fix)
        folder = os.path.dirname(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".polyarch-probe-", dir=folder)
    except OSError as e:
        why = {errno.EACCES: "it is not writable", errno.EPERM: "it is not writable",
               errno.EROFS: "its file system is read-only", errno.ENOSPC: "its disk is full"}.get(
            e.errno, f"it takes no new file ({e.strerror})")
        raise PolyarchError(f"cannot write {what} {path} in the folder {folder}: {why}", fix=fix) from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", keep_mode: bool = True) -> Iterator:
    """Open a temporary file beside `path` (behind its links) for writing; on success it is renamed
    over the target, on an error removed (the old file, if any, stays as it was)."""
    target = real_target(os.fspath(path))
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        if keep_mode and os.path.exists(target):
            shutil.copymode(target, tmp)
        else:  # as any file the user creates (mkstemp makes it 0600)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_held = {}  # temp folder -> its lock's file descriptor, held while the folder lives
_swept = False


@contextlib.contextmanager
def temp_dir(prefix: str = TEMP_PREFIX, dir: str | None = None) -> Iterator[str]:
    """A temporary folder (like tempfile.TemporaryDirectory) that holds a lock while its process
    lives, so that a later process removes it if this one is killed before it can."""
    global _swept
    if not _swept:
        _swept = True
        sweep_dead_temp()
    path = tempfile.mkdtemp(prefix=prefix, dir=dir)
    fd = os.open(os.path.join(path, LOCK), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _held[path] = fd
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(_held.pop(path))


def sweep_dead_temp(folder: str | None = None) -> list:
    """Remove the polyarch temporary folders (in `folder`, default the temp folder) whose
    process has died: their lock is free. -> the folders removed."""
    folder = folder or tempfile.gettempdir()
    removed = []
    try:
        names = [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        lock = os.path.join(path, LOCK)
        if path in _held or os.path.islink(path) or not os.path.isfile(lock):
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its process is alive
            os.close(fd)
            continue
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        removed.append(path)
    return removed


# A child started through this runs with PR_SET_PDEATHSIG = SIGKILL (and exits at once if its
# parent is already gone), then becomes the command: no Python code runs between fork and exec.
_WRAP = ("import ctypes,os,sys\n"
         "ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)\n"
         "os.getppid() == int(sys.argv[1]) or os._exit(137)\n"
         "os.execv(sys.argv[2], sys.argv[2:])\n")


def die_with_parent(cmd: list) -> list:
    """`cmd` (its first item a path) started so that it is killed when this process dies
    (Linux; elsewhere `cmd` as it is)."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-S", "-I", "-c", _WRAP, str(os.getpid()), *cmd]


def printable(text: object) -> str:
    """`text` with control characters escaped (\\x1b, \\n, ...): what a bundle says, shown on a
    terminal without letting it move the cursor, clear the screen or fake another line."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def unwind(signum: int, frame: object) -> None:
    """SIGTERM (and Ctrl-C) as an exception that unwinds: temporary folders and partial
    bundles are removed on the way out. Never inside an import: an exception crossing a native
    module's initialisation aborts the process (SIGABRT, seen while iree.compiler's bindings
    loaded), so there the signal is sent again 0.1 s later."""
    import signal
    import threading

    f = frame
    while f is not None:
        if f.f_code.co_filename.startswith("<frozen importlib"):
            timer = threading.Timer(0.1, os.kill, (os.getpid(), signum))
            timer.daemon = True
            timer.start()
            return
        f = f.f_back
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def terminate_unwinds() -> Iterator:
    """While inside: SIGTERM unwinds as an exception (SystemExit(143)) instead of ending the
    process at once, so temporary folders and half-written files are removed on the way out,
    as the CLI does. Only where SIGTERM has its default action and on the main thread (a
    program with a handler of its own keeps it)."""
    import signal
    import threading

    mine = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if mine:
        signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        if mine:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
