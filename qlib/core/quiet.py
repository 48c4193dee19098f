"""Library messages that tell a notebook's reader nothing, dropped by name and text (never every warning): each
entry says what it hides and why it is noise for qlab. Anything else a library says still shows."""
from __future__ import annotations

import functools
import logging
import re
import warnings
from typing import Any

# (logger, text in the message, why it says nothing here)
LOGGED = (
    ("torchao", "Failed to load", "torchao's CUDA-only kernels (mxfp8, cutlass) are absent on a CPU; qlab uses none"),
    ("torch.utils._pytree", "is an Enum subclass", "torchao registers its enums the old way at import"),
    ("transformers.modeling_utils", "`loss_type=None` was set", "the default causal-LM loss is the one meant"),
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true", "llm-compressor traces the model to calibrate it "
     "layer by layer; the note is for torch.export users"),
)
# (logger, level below which it is dropped, why)
LEVELS = (("bitsandbytes.autograd._functions", logging.ERROR,
           "LLM.int8 on a CPU casts fp32 inputs to fp16 and says so on every matmul: true, known, said in the notes"),)
# (text in the warning, why)
WARNED = (
    ("Attempting to save a model with offloaded modules", "llm-compressor saves a model it dispatched on the CPU"),
    ("You passed `quantization_config` or equivalent", "reloading a compressed-tensors folder with its own config"),
    ("`is_gradient_checkpointing` is deprecated", "peft reads an old attribute of transformers"),
    ("`gradient_checkpointing_enable` is deprecated", "peft's prepare_model_for_kbit_training calls the old name"),
)
# (loguru module of llm-compressor, why)
LOGURU = (("llmcompressor.utils.dev", "'No accelerator available! Compressing model on CPU': the CPU is the plan"),)


class _Drop(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_libraries() -> None:
    """Install the filters above (idempotent: a filter already on a logger is not added twice)."""
    for name, text, _ in LOGGED:
        log = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.text == text for f in log.filters):
            log.addFilter(_Drop(text))
    for name, level, _ in LEVELS:
        logging.getLogger(name).setLevel(level)
    for text, _ in WARNED:
        warnings.filterwarnings("ignore", message=".*" + re.escape(text))
    try:
        from loguru import logger
    except ImportError:
        return
    for module, _ in LOGURU:
        logger.disable(module)


def no_load_bars() -> None:
    """transformers' "Loading weights" and "Writing model shards" bars: under a second at the sizes run here, a
    line each in the executed notebooks (41 in 05); the studies' own bars stay. Called when a study or `formats`
    starts (importing transformers with qlib would slow every command)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def transient_bars(*modules: Any) -> None:
    """The progress bars of these library modules (each imports tqdm's class as `tqdm`) vanish when done
    (`leave=False`): shown while they run, not kept in the report (llm-compressor draws two per layer)."""
    for m in modules:
        bar = getattr(m, "tqdm", None)
        if bar is not None and not isinstance(bar, functools.partial):
            m.tqdm = functools.partial(bar, leave=False)
