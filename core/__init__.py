"""The engine: config, dataset, families, LoRA files, training, sampling, runs and the coach."""
import logging


class UserError(Exception):
    """An error the user fixes (a bad setting, a missing file, a model that does not fit): its
    message says what and how, so the CLI prints it in one line and exits 2. This module loads
    nothing heavy, so the CLI catches it before torch is imported."""


def quiet_optional_kernel_notes():
    """peft imports bitsandbytes, which looks for optional 4-bit CPU kernels through the
    `kernels` package; both log about it (offline: "Skipping publisher trust check"), on every
    run, about kernels we never use. Their warnings would come first in every error message."""
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
