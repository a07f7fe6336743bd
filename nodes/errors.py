"""A failure inside a node reaches the ComfyUI user as one line (the node, what failed, what to
change); the traceback goes to the log, where a bug report can take it from."""
import contextlib
import logging

log = logging.getLogger("loralab")

# ComfyUI ends a cancelled node with this exception; it must pass through untouched.
INTERRUPTION = "InterruptProcessingException"


class NodeError(RuntimeError):
    """The one line a node shows when it fails; `original` is the exception behind it."""

    def __init__(self, message, original):
        super().__init__(message)
        self.original = original


def _advice(error):
    """Our own errors (UserError and ValueError subclasses: config, dataset, model, precision,
    resume, memory fit, a full disk) already say what to change; anything else is unexpected."""
    from ..core import UserError  # a full disk (DiskFull), a locked run folder, a damaged file
    from ..core.trainer import OutOfMemory

    if isinstance(error, (ValueError, OutOfMemory, UserError)):
        return ""
    return (" This was not expected: the traceback is in the ComfyUI log. Try train.dtype fp32 "
            "to rule out precision, and report it with the log if it persists.")


@contextlib.contextmanager
def one_line_errors(node):
    try:
        yield
    except NodeError:
        raise
    except Exception as error:
        if type(error).__name__ == INTERRUPTION:
            raise
        log.error("LoRA Lab %s failed", node, exc_info=error)
        first_line = (str(error).strip().splitlines() or [""])[0]
        if isinstance(error, ValueError) and len(str(error).splitlines()) > 1:
            first_line = "; ".join(line.strip(" -") for line in str(error).splitlines() if line.strip())
        raise NodeError(f"{node} failed ({type(error).__name__}): {first_line}{_advice(error)}",
                        error) from None
