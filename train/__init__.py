"""The distributed jobs: pre-training, SFT, Stage II gate tuning, evaluation and the harness."""

import logging


class _CpuNotice(logging.Filter):
    """DeepSpeed warns on every process of a machine without a GPU that it chose the CPU ("If
    you have GPU or other accelerator, we were unable to detect it"). The jobs say which
    devices they train on instead (``CPU ranks, gloo`` in the engine's line), so the warning
    is dropped; every other DeepSpeed message is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU.")


# Before DeepSpeed's first import, which creates this logger and warns through it.
logging.getLogger("DeepSpeed").addFilter(_CpuNotice())
