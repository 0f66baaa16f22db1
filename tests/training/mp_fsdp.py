"""Run by torchrun in test_fsdp: train one config, then write this rank's measurements.

torchrun --nproc_per_node N tests/training/mp_fsdp.py RUN.yaml OUT_DIR [--die-at STEP] [--resume CHECKPOINT] [--set ...]

OUT_DIR/rankR.json: the live bytes of this process's frozen base tensors (its shards under
fsdp) and the number of decoder blocks sharded. `--die-at STEP` kills rank 1 (SIGKILL) as
it starts optimizer step STEP, the way an out-of-memory kill ends a process.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from torch.distributed.tensor import DTensor

from peftkit.training import loop
from peftkit.training.config import load_config


def _frozen_bytes(model) -> int:
    local = (p.to_local() if isinstance(p, DTensor) else p for p in model.parameters() if not p.requires_grad)
    return sum(t.numel() * t.element_size() for t in local)


def _die_at(step: int) -> None:
    real = loop._Run.train_step

    def train_step(self, wrapper, optimizer, scheduler, train_set, index):  # noqa: ANN001, ANN202
        if self.acc.process_index == 1 and index + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, wrapper, optimizer, scheduler, train_set, index)

    loop._Run.train_step = train_step


if __name__ == "__main__":
    config_path, out, *rest = sys.argv[1:]
    resume = rest[rest.index("--resume") + 1] if "--resume" in rest else None
    if "--die-at" in rest:
        _die_at(int(rest[rest.index("--die-at") + 1]))
    overrides = rest[rest.index("--set") + 1 :] if "--set" in rest else []
    result = loop.train(load_config(config_path, overrides), resume=resume, quiet=True)
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump({"frozen_bytes": _frozen_bytes(result.model)}, handle)
