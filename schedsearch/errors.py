import contextlib
import errno
import os
import signal
import sys
import threading


class UserError(Exception):
    """A problem the user can fix (bad file, flag, target...): the CLI prints it as one line."""


class DamagedFile(UserError):
    """A file of ours that does not parse (a kill or a full disk while it was written elsewhere)."""

    def __init__(self, path, message: str):
        super().__init__(message)
        self.path = path


# Ctrl-C. An exception raised inside TVM's C++ calls (a search round) comes back out as another error
# or ends the process (std::terminate). So during a search the first Ctrl-C only sets INTERRUPTED:
# the search stops after the round in flight and search() raises KeyboardInterrupt from Python.
# The second one ends the process at once (exit_now): raising KeyboardInterrupt then could leave the
# interpreter's exit joining TVM's pool threads for ever (2 of 4 double Ctrl-C's hung: issue 23).
INTERRUPTED = threading.Event()
_in_search = threading.Event()
INTERRUPTED_MESSAGE = ("schedsearch: interrupted; everything measured so far is in the run directory's "
                       "database: run the same command again to resume")


def catch_interrupts() -> None:
    """Ctrl-C: during a search, stop after the round in flight; a second time, at once."""
    def handler(signum, frame):
        first = not INTERRUPTED.is_set()
        INTERRUPTED.set()
        if first and _in_search.is_set():
            print("\nschedsearch: stopping after the round in flight (Ctrl-C again: at once)", file=sys.stderr)
            return
        if not first:
            exit_now(130, "\n" + INTERRUPTED_MESSAGE)
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        _count_interrupts_in_a_thread()


_counting = []


def _count_interrupts_in_a_thread() -> None:
    """Python runs a signal handler only when the main thread is back in Python: in TVM's evolutionary
    search that took 6.7 s after the second Ctrl-C. The C-level handler writes each signal's number to
    the wakeup fd at once; a thread reading it ends the process on the second SIGINT."""
    if _counting:
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def count() -> None:
        seen = 0
        while True:
            for signum in os.read(read_end, 64):
                seen += signum == signal.SIGINT
                if seen >= 2:
                    INTERRUPTED.set()
                    exit_now(130, "\n" + INTERRUPTED_MESSAGE)

    _counting.append(threading.Thread(target=count, name="schedsearch-interrupts", daemon=True))
    _counting[0].start()


def exit_now(code: int, message: str) -> None:
    """Print `message`, kill this process's children (pool workers; they die with it anyway, see
    measure.worker_setup) and exit without waiting for any thread."""
    with contextlib.suppress(Exception):
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    kill_children()
    os._exit(code)


def kill_children() -> None:
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()


@contextlib.contextmanager
def searching():
    _in_search.set()
    try:
        yield
    finally:
        _in_search.clear()


def os_error_message(e: OSError) -> str | None:
    """One line for an OSError the user can act on (disk full, no permission, read-only, a file where a
    directory should be), None for others."""
    path = e.filename if e.filename is not None else "?"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return str(DiskFull(path, e.strerror))
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {e.strerror}: make it writable, or choose another -o"
    if e.errno in (errno.ENOTDIR, errno.EISDIR):
        return f"{path}: {e.strerror}: choose another -o"
    return None


class DiskFull(UserError):
    def __init__(self, path, strerror: str = "No space left on device"):
        super().__init__(f"disk full: writing {path}: {strerror}: free some space, then run the same command "
                         "again to resume (what was written is whole)")
        self.path = path


# The first write that failed for want of space (a DiskFull), during a search: every later write is skipped,
# the search stops after the round in flight, and search() raises it.
DISK_FULL: list = []


def note_disk_full(e: OSError, path=None) -> bool:
    """Record `e` if it is a full disk (the first one only); True if it is one."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return False
    if not DISK_FULL:
        DISK_FULL.append(DiskFull(path if path is not None else e.filename, e.strerror or os.strerror(e.errno)))
    return True


def disk_nearly_full(path, margin_bytes: int = 64 << 10) -> bool:
    """Less than `margin_bytes` free where `path` lives (what a tool that failed without saying why, such as
    the linker, leaves to guess)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin_bytes
