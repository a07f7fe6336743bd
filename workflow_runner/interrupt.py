"""A process-wide "please stop" flag that long-running nodes poll, and Ctrl+C wiring for it.

The trainer checks stop_requested() every step, so the first Ctrl+C lets it save and return;
the executor then stops between nodes. A second Ctrl+C is the usual hard KeyboardInterrupt.
"""

import signal
import sys
import threading
from contextlib import contextmanager

_stop = threading.Event()

STOP_MESSAGE = "\nStopping after the current step (saving first). Press Ctrl+C again to abort now."


def request_stop() -> None:
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def clear() -> None:
    _stop.clear()


@contextmanager
def handle_ctrl_c(message: str | None = STOP_MESSAGE):
    """While inside: first SIGINT -> request_stop() (and print `message`), second -> KeyboardInterrupt.

    Clears the flag on entry. Python only lets the main thread install signal handlers;
    elsewhere this does nothing but clear the flag.
    """
    clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    presses = 0

    def on_sigint(signum, frame):
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt
        request_stop()
        if message:
            print(message, file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        # None means a handler not installed from Python; the default is the closest we can do.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
