import signal
import threading


class UserError(Exception):
    """A problem the user can fix (bad file, flag, target...): the CLI prints it as one line."""


INTERRUPTED = threading.Event()


def catch_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt, but one raised inside TVM's C++ calls comes back out of them as
    another error: remember that it happened, so callers can tell an interruption from a failure."""
    def handler(signum, frame):
        INTERRUPTED.set()
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
