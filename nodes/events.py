"""Where long-running nodes send the trainer's events besides ComfyUI's progress bar. Headless,
`loralab run` listens here with its printer; inside ComfyUI nobody does."""
import contextlib

_listeners = []


@contextlib.contextmanager
def listening(listener):
    """Calls listener(event) with every event published while inside."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def publish(event):
    for listener in list(_listeners):
        listener(event)
