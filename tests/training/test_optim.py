"""`training.optimizer`: bitsandbytes' 8-bit and paged AdamW track torch's AdamW, with a quarter of the state."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_llama
from safetensors.torch import load_file
from tiny_models import make_model_dir
from tiny_run import write_run
from torch.utils._pytree import tree_leaves

import peftkit
import peftkit.training.loop
import peftkit.training.optim as optim
from peftkit.errors import ConfigError
from peftkit.training.checkpoint import list_checkpoints
from peftkit.training.config import TrainingConfig, load_config
from peftkit.training.loop import train
from peftkit.training.optim import OPTIMIZERS, build_optimizer, check_optimizer


def state_bytes(optimizer: torch.optim.Optimizer, index: int) -> int:
    """Bytes of the state tensors of the optimizer's `index`-th parameter (moments, 8-bit codes, scales, maps)."""
    state = optimizer.state[optimizer.param_groups[0]["params"][index]]
    return sum(value.numel() * value.element_size() for value in state.values() if torch.is_tensor(value))


def trajectory(name: str, steps: int = 5) -> tuple[list[float], torch.optim.Optimizer]:
    """Losses of `steps` full fine-tuning steps of a tiny Llama whose MLP weights (16384 elements) get 8-bit state."""
    model = tiny_llama(0, hidden_size=64, intermediate_size=256).train()
    peftkit.adapt(model, "full")
    optimizer = build_optimizer((p for p in model.parameters() if p.requires_grad), name, 1e-3, 0.01)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: paging falls back to unpaged on CPU
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return losses, optimizer


def test_every_optimizer_runs_on_cpu() -> None:
    for name in OPTIMIZERS:
        check_optimizer(name, torch.device("cpu"))  # measured here: all four take a step


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw"])
def test_bitsandbytes_optimizers_track_adamw(name: str) -> None:
    reference, adamw = trajectory("adamw")
    losses, optimizer = trajectory(name)
    assert reference[-1] < reference[0] - 0.1  # it learns: 4.85 -> 4.23 in 5 steps
    # measured: the 8-bit ones stay within 1.5e-5 of AdamW's losses over 5 steps, paged (32-bit) within 5e-7
    tolerance = 1e-4 if "8bit" in name else 2e-6
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) < tolerance, (losses, reference)
    # 8-bit state per element: two uint8 codes, a float32 scale per 256, two 256-entry code maps per tensor;
    # bitsandbytes keeps tensors under 4096 elements (norms, the 32 x 64 k/v projections) in float32.
    large = [i for i, p in enumerate(adamw.param_groups[0]["params"]) if p.numel() >= 4096]
    ratios = [state_bytes(adamw, i) / state_bytes(optimizer, i) for i in large]
    total = sum(map(functools.partial(state_bytes, adamw), range(len(adamw.state))))
    ours = sum(map(functools.partial(state_bytes, optimizer), range(len(optimizer.state))))
    if "8bit" in name:  # measured: 3.16x on 64 x 64, 3.71x on 64 x 256 (-> 3.94x when large); 3.11x in all
        assert len(large) == 12 and min(ratios) > 3.15 and max(ratios) > 3.7 and total / ours > 3.1, ratios
    else:  # paged_adamw keeps float32 moments: the same bytes (but for torch's 4-byte step tensors)
        assert total - ours == 4 * len(adamw.state), (total, ours)


def test_unknown_optimizer_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"training.optimizer 'adam_8bit' does not exist\. Did you mean 'adamw_8bit'"):
        TrainingConfig(optimizer="adam_8bit")
    with pytest.raises(ConfigError, match="Optimizers: adamw, adamw_8bit, paged_adamw_8bit, paged_adamw."):
        TrainingConfig(optimizer="sgd")


def test_an_optimizer_that_cannot_run_here_is_refused_with_those_that_can(monkeypatch) -> None:
    import bitsandbytes

    def no_kernel(self, *args, **kwargs):
        raise RuntimeError("no 8-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes.optim.PagedAdamW8bit, "step", no_kernel)
    optim._failure.cache_clear()
    try:
        with pytest.raises(ConfigError) as error:
            TrainingConfig(optimizer="paged_adamw_8bit")
    finally:
        optim._failure.cache_clear()
    assert str(error.value) == (
        "training.optimizer 'paged_adamw_8bit' cannot run on cpu here (RuntimeError: no 8-bit kernel for this "
        "device). Optimizers that run here: adamw, adamw_8bit, paged_adamw."
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def full_run(root: Path, model_dir: Path, **sections: dict) -> Path:
    """`write_run`'s config with full fine-tuning as the method (its LoRA options dropped)."""
    path = write_run(root, model_dir, **sections)
    config = yaml.safe_load(path.read_text())
    config["method"] = {"name": "full"}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_resume_with_an_8bit_optimizer_is_bit_identical(
    tmp_path: Path, model_dir: Path, name: str, monkeypatch
) -> None:
    """Full fine-tuning, so the 259 x 32 embedding and head have 8-bit state; stop after step 2 of 4, resume."""
    sections = dict(training={"max_steps": 4, "optimizer": name, "learning_rate": 1e-3}, output={"save_every": 2})
    train(load_config(full_run(tmp_path / "whole", model_dir, **sections)), quiet=True)
    real_save = peftkit.training.loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    config = load_config(full_run(tmp_path / "split", model_dir, **sections))
    monkeypatch.setattr(peftkit.training.loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config, quiet=True)
    monkeypatch.undo()
    (checkpoint,) = list_checkpoints(tmp_path / "split" / "run" / "checkpoints")
    saved = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert sum(t.dtype == torch.uint8 for t in tree_leaves(saved) if torch.is_tensor(t)) == 4  # 2 tensors x 2 moments
    train(config, resume=True, quiet=True)
    expected = load_file(tmp_path / "whole" / "run" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "split" / "run" / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
