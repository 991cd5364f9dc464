"""Quiet the libraries quantune drives (their warnings, INFO logs and progress bars), for the CLI and the
benchmark processes alike."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    # the peers' import-time notices (torchao's optional CUDA kernels, bitsandbytes' optional kernels package,
    # torch's pytree deprecation note on their enums) are not the user's concern on every command
    quiet = ("transformers", "diffusers", "peft", "accelerate", "huggingface_hub", "torchao", "bitsandbytes",
             "torch.utils._pytree")  # fmt: skip
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass
