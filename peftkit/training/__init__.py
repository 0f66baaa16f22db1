"""`peftkit train`: the YAML config, data, model loading, the loop and its checkpoints.

The only users of YAML and accelerate: `config` (checked in full before any model
loads), `data` (files to tokenized examples), `models` (a model and tokenizer by
name, the embedded Gemma-3-270M), `loop` (the accelerate loop), `checkpoint`
(atomic checkpoints and exact resume), `rundir` (an output directory holds one run;
what a resume may change); the memory savers `optim` (8-bit and paged optimizers),
`loss` (chunked cross-entropy) and `activations` (gradient checkpointing); `quantized`
(loading straight into 4 bits).
"""

from peftkit.training.config import RunConfig, load_config
from peftkit.training.loop import TrainResult, train

__all__ = ["RunConfig", "TrainResult", "load_config", "train"]
