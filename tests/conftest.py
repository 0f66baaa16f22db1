"""Shared fixtures and helpers; the tiny random-weight models themselves are built in tiny_models.py."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The tiny models live in tiny_models.py; the tests import them from here too.
from tiny_models import MODEL_BUILDERS, VOCAB, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402,F401
from torch import nn

import peftkit


def model_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def randomize_adapters(model: torch.nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Give every trainable tensor non-zero values, so a test sees the adapter's effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * std)


def train_steps(
    model: torch.nn.Module, ids: torch.Tensor, steps: int = 3, lr: float = 1e-2, labels: torch.Tensor | None = None
) -> list[float]:
    """`steps` AdamW steps on the model's own loss over `ids` (labels: `ids`); the loss of each step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids if labels is None else labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=sorted(MODEL_BUILDERS))
def model_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nothing can be created in: mode 0o555, and immutable too when running as root."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    try:
        (path / "probe").mkdir()
    except OSError:
        pass
    else:  # root ignores the mode bits
        (path / "probe").rmdir()
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        if not immutable:
            path.chmod(0o755)
            pytest.skip("cannot make a read-only directory here (root, and chattr +i is refused)")
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


def fill_disk(path: Path, leave: int = 16 << 10) -> None:
    """Fill the file system at `path` but for `leave` bytes (a buffered write stops at ENOSPC)."""
    free = shutil.disk_usage(path).free - leave
    with open(path / f".filler-{free}", "wb") as filler:
        filler.write(bytes(max(free, 0)))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs), for writers to meet a real ENOSPC in their own code
    (safetensors, torch.save), not a stand-in raised by a test (see `fill_disk`).

    Needs root (mount); skipped where it is refused.
    """
    path = tmp_path / "small-disk"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # a failed writer may hold a file open


# Several adapters on one tiny Llama, for the routing, combining and steering tests.
NAMES = ["sql", "chat", "math"]


def three_adapters(method: str = "lora", **options: object) -> nn.Module:
    model = tiny_llama()
    for seed, name in enumerate(NAMES):
        peftkit.adapt(model, method, name, r=4, target_modules=["q_proj", "v_proj", "down_proj"], **options)
        randomize_adapters(model, seed=seed + 1)  # only `name` is trainable right now
    return model


def logits_with(model: nn.Module, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    if adapter == "base":
        with peftkit.disable_adapters(model):
            return model(input_ids=ids).logits
    peftkit.set_active_adapters(model, adapter)
    return model(input_ids=ids).logits
