"""CLI mistakes end in one line on stderr and exit status 2, with nothing half-written left behind."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from conftest import randomize_adapters
from safetensors.torch import load_file, save_file
from tiny_models import make_model_dir
from transformers import AutoModelForCausalLM

import peftkit
import peftkit.training.models
from peftkit.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


LOW_RANK = {"r": 4, "target_modules": "all-linear"}


def save_trained(model_dir: Path, directory: Path, method: str = "lora", options: dict = LOW_RANK) -> Path:
    model = peftkit.adapt(AutoModelForCausalLM.from_pretrained(model_dir), method, **options)
    randomize_adapters(model)
    return peftkit.save_adapter(model, directory)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    return save_trained(model_dir, tmp_path_factory.mktemp("adapter") / "lora")


def fails(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    """Run the command; it must exit 2, its last stderr line the one error line, holding every fragment.

    (Lines before it can only be transformers' progress bars, redrawn with carriage returns.)
    """
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.replace("\r", "\n").splitlines()
    error = lines[-1]
    assert error.startswith(f"peftkit {argv[0]}: error: ") and captured.err.endswith(error + "\n")
    assert [line for line in lines if "error" in line] == [error] and captured.out == ""
    for fragment in fragments:
        assert fragment in error
    return error


def contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks that must come before the model loads: loading fails the test."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(peftkit.training.models, "load_model", refuse)


def test_merge_out_that_is_a_file_is_refused(tmp_path: Path, adapter: Path, capsys, no_model_loads) -> None:
    out = tmp_path / "merged"
    out.write_text("mine")
    fails(capsys, ["merge", str(adapter), "--out", str(out)], f"--out '{out}' is an existing file")
    assert out.read_text() == "mine"


@pytest.mark.parametrize("where", ["base", "adapter", "above the base"])
def test_merge_out_that_holds_an_input_is_refused_even_with_force(
    where: str, adapter: Path, model_dir: Path, capsys, no_model_loads
) -> None:
    out = {"base": model_dir, "adapter": adapter, "above the base": model_dir.parent}[where]
    before = contents(model_dir), contents(adapter)
    for force in ([], ["--force"]):
        what = "the adapter" if where == "adapter" else "the base model"
        fails(capsys, ["merge", str(adapter), "--out", str(out), *force], f"--out '{out}' holds {what}")
    assert (contents(model_dir), contents(adapter)) == before


def test_merge_into_a_used_directory_needs_force_and_then_replaces_it(tmp_path: Path, adapter: Path, capsys) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("old")
    fails(capsys, ["merge", str(adapter), "--out", str(out)], "already exists and is not empty; pass --force")
    assert contents(out) == {"notes.txt": b"old"}
    assert main(["merge", str(adapter), "--out", str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 259
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp or old directory left


def test_merge_into_a_read_only_directory_fails_before_the_model_loads(
    read_only_dir: Path, adapter: Path, capsys, no_model_loads
) -> None:
    out = read_only_dir / "merged"
    fails(capsys, ["merge", str(adapter), "--out", str(out)], f"cannot write '{out}': ")
    assert list(read_only_dir.iterdir()) == []


def test_merge_onto_a_full_disk_leaves_nothing(tmp_path: Path, adapter: Path, capsys, monkeypatch) -> None:
    def full_disk(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 100)  # a first part made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    out = tmp_path / "merged"
    fails(capsys, ["merge", str(adapter), "--out", str(out)], f"cannot write '{out}': No space left on device (ENOSPC)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_merged_4bit_adapter_is_a_plain_float_model_transformers_loads(
    tmp_path: Path, model_dir: Path, method: str, capsys
) -> None:
    adapter = save_trained(model_dir, tmp_path / method, method)
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    merged = AutoModelForCausalLM.from_pretrained(out)
    # The adapted 4-bit model, in train mode (bitsandbytes' CPU eval kernel rounds differently), dropout 0.
    adapted = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter).train()
    assert peftkit.adapter_methods(adapted)["default"].name == method
    ids = torch.tensor([[3, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter shows
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)  # measured: 1.5e-7


@pytest.mark.parametrize("tokens", ["0", "-3"])
def test_generate_needs_a_positive_max_new_tokens(model_dir: Path, tokens: str, capsys, no_model_loads) -> None:
    argv = ["generate", "--base", str(model_dir), "--prompt", "n=07:", "--max-new-tokens", tokens]
    fails(capsys, argv, f"--max-new-tokens must be a positive integer, got {tokens}.")


def test_generate_and_merge_name_a_wrong_adapter_directory_before_the_model_loads(
    tmp_path: Path, model_dir: Path, capsys, no_model_loads
) -> None:
    argv = ["generate", "--base", str(model_dir), "--adapter", str(tmp_path), "--prompt", "n=07:"]
    fails(capsys, argv, f"no adapter_config.json in '{tmp_path}'")
    argv = ["merge", str(tmp_path), "--base", str(model_dir), "--out", str(tmp_path / "merged")]
    fails(capsys, argv, f"no adapter_config.json in '{tmp_path}'")


def test_inspect_a_truncated_weights_file_names_it(tmp_path: Path, adapter: Path, capsys) -> None:
    copy = tmp_path / "adapter"
    copy.mkdir()
    (copy / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    (copy / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    fails(
        capsys,
        ["inspect", str(copy)],
        f"{copy}/adapter_model.safetensors is not a readable safetensors file",
        "file not fully covered",
    )


def test_inspect_a_directory_holding_only_a_pickled_adapter_says_so(tmp_path: Path, capsys) -> None:
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    fails(capsys, ["inspect", str(tmp_path)], "adapter_model.bin exists, but peftkit never unpickles files")


def test_generate_refuses_a_prompt_without_tokens_before_the_model_loads(
    model_dir: Path, capsys, no_model_loads
) -> None:
    fails(capsys, ["generate", "--base", str(model_dir), "--prompt", ""], "--prompt '' gives no tokens to continue")


def test_inspect_a_corrupt_peftkit_record_names_the_file(tmp_path: Path, adapter: Path, capsys) -> None:
    copy = tmp_path / "adapter"
    copy.mkdir()
    (copy / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    save_file(load_file(adapter / "adapter_model.safetensors"), copy / "adapter_model.safetensors", {"peftkit": "{"})
    fails(capsys, ["inspect", str(copy)], f"{copy}/adapter_model.safetensors: peftkit's record in its metadata")


def test_merge_of_a_method_without_a_weight_delta_writes_nothing(tmp_path: Path, model_dir: Path, capsys) -> None:
    adapter = save_trained(model_dir, tmp_path / "bottleneck", "bottleneck", {})
    out = tmp_path / "merged"
    fails(capsys, ["merge", str(adapter), "--out", str(out)], "a bottleneck adapter", "cannot be merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bottleneck"]
