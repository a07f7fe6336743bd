"""The engine: config, dataset, families, LoRA files, training, sampling, runs and the coach."""
import logging


def quiet_optional_kernel_notes():
    """peft imports bitsandbytes, which looks for optional 4-bit CPU kernels through the
    `kernels` package; both log about it (offline: "Skipping publisher trust check"), on every
    run, about kernels we never use. Their warnings would come first in every error message."""
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
