"""Run by torchrun in test_train's multi-process test: train, then dump this rank's adapter.

torchrun --nproc_per_node 2 tests/training/mp_train.py RUN.yaml OUT_DIR [--set ...]
"""

from __future__ import annotations

import os
import sys

from safetensors.torch import save_file

from peftkit.peft_format import adapter_state_dict
from peftkit.training.config import load_config
from peftkit.training.loop import train

if __name__ == "__main__":
    result = train(load_config(sys.argv[1], sys.argv[3:]), quiet=True)
    tensors = {k: v.detach().contiguous() for k, v in adapter_state_dict(result.model).items()}
    save_file(tensors, os.path.join(sys.argv[2], f"rank{os.environ.get('RANK', '0')}.safetensors"))
