"""`peftkit train` and `peftkit estimate`: the YAML config, data, model loading, the loop, its checkpoints,
and the memory meter.

The package's only users of YAML and accelerate. The run: `config` (checked in full
before any model loads), `data` (files to tokenized examples, the batch order),
`models` (a model, its skeleton and tokenizer by name, the embedded Gemma-3-270M),
`quantized` (loading straight into 4 bits), `loop` (the accelerate loop: prepare, step,
finish), `metrics` (its metrics.jsonl lines), `checkpoint` (atomic checkpoints and exact
resume), `rundir` (an output directory holds one run; what a resume may change). The
memory savers: `optim` (8-bit and paged optimizers, LoRA+), `loss` (chunked
cross-entropy), `activations` (gradient checkpointing). The memory meter: `memory`
(live tensor bytes by category, under both the loop and the estimate), `simulate` (a
step on fake tensors), `estimate` (what fits a GPU), `realstep` (a real step measured by
the profiler, what the estimate is checked against).
"""

from peftkit.training.config import RunConfig, load_config
from peftkit.training.loop import TrainResult, train

__all__ = ["RunConfig", "TrainResult", "load_config", "train"]
