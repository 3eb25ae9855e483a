import contextlib
import signal
import sys
import threading


class UserError(Exception):
    """A problem the user can fix (bad file, flag, target...): the CLI prints it as one line."""


# Ctrl-C. An exception raised inside TVM's C++ calls (a search round) comes back out as another error
# or ends the process (std::terminate). So during a search the first Ctrl-C only sets INTERRUPTED:
# the search stops after the round in flight and search() raises KeyboardInterrupt from Python.
INTERRUPTED = threading.Event()
_in_search = threading.Event()


def catch_interrupts() -> None:
    """Ctrl-C: during a search, stop after the round in flight; otherwise (or a second time) at once."""
    def handler(signum, frame):
        first = not INTERRUPTED.is_set()
        INTERRUPTED.set()
        if first and _in_search.is_set():
            print("\nschedsearch: stopping after the round in flight (Ctrl-C again: at once)", file=sys.stderr)
            return
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def searching():
    _in_search.set()
    try:
        yield
    finally:
        _in_search.clear()
