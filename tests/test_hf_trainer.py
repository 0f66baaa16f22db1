"""transformers' Trainer and TRL's SFTTrainer on a peftkit model: adapters trained, saved in PEFT's format, resumed.

Every run is a tiny Llama on CPU with a word-level tokenizer built here (no hub).
Tolerances: logits of the PEFT-loaded adapter within 1e-5 of peftkit's (float32, the
same arithmetic in another order); a resumed run's losses and final tensors within
1e-6 of an uninterrupted run's (on CPU they are equal in practice).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_llama
from datasets import Dataset
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from trl import SFTConfig, SFTTrainer

import peftkit
from peftkit.errors import AdapterNotFoundError, AdapterStateError, ConfigError, ShapeMismatchError

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "model.safetensors.index.json"}
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "config.json"}
CHECKPOINT_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
STEPS, SAVE_AT = 6, 3


def adapted(seed: int = 0) -> LlamaForCausalLM:
    return peftkit.adapt(tiny_llama(seed), "lora", **LORA)


def adapter_paths(model: torch.nn.Module, name: str = "default") -> set[str]:
    return set(peftkit.adapter_methods(model)[name].trainable_state(model, name))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: "w7" is token 7; ids 0-2 are pad, bos, eos (the tiny Llama config's bos/eos)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def token_rows(count: int, length: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (count, length), generator=torch.Generator().manual_seed(0))


def plain_trainer(model: torch.nn.Module, output_dir: Path) -> Trainer:
    """A Trainer on pre-tokenized rows (labels = inputs), checkpointing every SAVE_AT steps."""
    rows = [{"input_ids": row, "labels": row} for row in token_rows(4 * STEPS)]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=SAVE_AT, logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=rows)


def sft_trainer(model: torch.nn.Module, output_dir: Path) -> SFTTrainer:
    """TRL's SFTTrainer on text it tokenizes itself, with its defaults (gradient checkpointing on)."""
    text = Dataset.from_dict({"text": [" ".join(f"w{i}" for i in row) for row in token_rows(4 * STEPS, 12).tolist()]})
    args = SFTConfig(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=SAVE_AT, logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        max_length=16, bf16=False,
    )  # fmt: skip
    return SFTTrainer(model=model, args=args, train_dataset=text, processing_class=tiny_tokenizer())


TRAINERS: dict[str, Callable[[torch.nn.Module, Path], Trainer]] = {"trainer": plain_trainer, "sft": sft_trainer}


@pytest.fixture(params=sorted(TRAINERS))
def make_trainer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Trainer]:
    monkeypatch.setenv("CI", "1")  # TRL pings its telemetry server from every trainer outside CI
    return TRAINERS[request.param]


class StepCounter(TrainerCallback):
    """Records the number of every optimizer step a run takes."""

    def __init__(self) -> None:
        self.done: list[int] = []

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: object) -> None:
        self.done.append(state.global_step)


def losses(trainer: Trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_trains_only_the_adapter_and_saves_what_peft_loads(
    make_trainer: Callable[..., Trainer], ids: torch.Tensor, tmp_path: Path
) -> None:
    model = adapted()
    before = {key: t.clone() for key, t in model.state_dict().items()}
    trainer = make_trainer(model, tmp_path / "run")
    trainer.train()
    changed = {key for key, t in model.state_dict().items() if not torch.equal(t, before[key])}
    assert changed == adapter_paths(model) and len(changed) == 2 * 2 * 2  # layers x targets x (A, B)

    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert ADAPTER_FILES <= files and not files & FULL_MODEL_FILES
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert len(saved) == 8 and all(k.startswith("base_model.model.") and ".lora_" in k for k in saved)
    checkpoint = set(os.listdir(tmp_path / "run" / f"checkpoint-{SAVE_AT}"))
    assert ADAPTER_FILES | CHECKPOINT_FILES <= checkpoint and not checkpoint & FULL_MODEL_FILES

    model.eval()
    with torch.no_grad():
        expected, base = model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "final"))(input_ids=ids).logits
    assert (loaded - expected).abs().max() <= 1e-5
    assert (expected - base).abs().max() > 1e-3  # the adapter did train: equality above is not trivial


def test_resumed_run_continues_where_the_uninterrupted_run_went(
    make_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    whole = adapted()
    straight = make_trainer(whole, tmp_path / "straight")
    straight.train()

    resumed_model = adapted()
    randomize_adapters(resumed_model)  # the adapter starts elsewhere: only the checkpoint can make it match
    resumed = make_trainer(resumed_model, tmp_path / "resumed")
    steps = StepCounter()
    resumed.add_callback(steps)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / f"checkpoint-{SAVE_AT}"))

    assert steps.done == list(range(SAVE_AT + 1, STEPS + 1))  # it ran steps 4-6 only
    # Steps 1-3 of its history come from the checkpoint's trainer_state.json, 4-6 it computed.
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6)
    for path, tensor in peftkit.adapter_state_dict(whole).items():
        torch.testing.assert_close(peftkit.adapter_state_dict(resumed_model)[path], tensor, rtol=0, atol=1e-6)


def test_several_adapters_save_in_peft_layout(ids: torch.Tensor, tmp_path: Path) -> None:
    """PeftModel's layout: "default" at the top, others in subfolders; the index names the active one."""
    model = adapted()
    peftkit.adapt(model, "lora", "second", r=2, alpha=4, target_modules=["k_proj"])
    randomize_adapters(model)  # "second" is active and trainable; give "default" values too
    with torch.no_grad():
        for tensor in peftkit.adapter_state_dict(model, "default").values():
            tensor.add_(0.1)
    model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == ADAPTER_FILES | {"second"}
    assert set(os.listdir(tmp_path / "second")) == {"adapter_config.json", "adapter_model.safetensors"}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == adapter_paths(model, "second")
    assert set(index["weight_map"].values()) == {"second/adapter_model.safetensors"}

    for name, directory in (("default", tmp_path), ("second", tmp_path / "second")):
        peftkit.set_active_adapters(model, name)
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(directory))(input_ids=ids).logits
        assert (loaded - expected).abs().max() <= 1e-5


def test_save_arguments(tmp_path: Path) -> None:
    model = adapted()
    model.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()

    zeros = {path: torch.zeros_like(t) for path, t in peftkit.adapter_methods(model)["default"]
             .trainable_state(model, "default").items()}  # fmt: skip
    model.save_pretrained(tmp_path / "given", state_dict={**model.state_dict(), **zeros})
    assert all(t.abs().sum() == 0 for t in load_file(tmp_path / "given" / "adapter_model.safetensors").values())

    with pytest.raises(ConfigError, match="safe_serialization=False"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ConfigError, match="variant"):
        model.save_pretrained(tmp_path, variant="fp16")
    with pytest.raises(AdapterNotFoundError, match="'nope'.*adapters: default"):
        model.save_pretrained(tmp_path, selected_adapters=["nope"])


def test_load_state_dict_reads_peft_names_into_the_active_adapter(ids: torch.Tensor, tmp_path: Path) -> None:
    source = adapted()
    randomize_adapters(source)
    source.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    target = adapted(seed=0)
    result = target.load_state_dict(tensors, strict=False)
    assert result.unexpected_keys == [] and not set(result.missing_keys) & adapter_paths(target)
    with torch.no_grad():
        assert torch.equal(target(input_ids=ids).logits, source(input_ids=ids).logits)

    with pytest.raises(ShapeMismatchError, match="1 missing"):
        target.load_state_dict(dict(list(tensors.items())[1:]), strict=False)
    peftkit.adapt(target, "lora", "second", **LORA)
    peftkit.set_active_adapters(target, ["default", "second"])
    with pytest.raises(AdapterStateError, match=r"active adapters \['default', 'second'\]"):
        target.load_state_dict(tensors, strict=False)


def test_unloaded_and_in_place_models_save_as_plain_models(ids: torch.Tensor, tmp_path: Path) -> None:
    model = adapted()
    randomize_adapters(model)
    merged = peftkit.merge_and_unload(model)
    assert "save_pretrained" not in vars(merged) and "load_state_dict" not in vars(merged)
    merged.save_pretrained(tmp_path / "merged")
    assert {"model.safetensors", "config.json"} <= set(os.listdir(tmp_path / "merged"))
    assert "adapter_config.json" not in os.listdir(tmp_path / "merged")
    with torch.no_grad():
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        assert (reloaded - merged(input_ids=ids).logits).abs().max() <= 1e-5

    emptied = adapted()
    peftkit.delete_adapter(emptied, "default")
    emptied.save_pretrained(tmp_path / "emptied")
    assert {"model.safetensors", "config.json"} <= set(os.listdir(tmp_path / "emptied"))
    assert not set(os.listdir(tmp_path / "emptied")) & ADAPTER_FILES

    full = peftkit.adapt(tiny_llama(), "full")  # its adapter is the model's own weights
    assert "save_pretrained" not in vars(full)
