"""`peftkit estimate`: GPU sizes and names, the fit, suggestions and search, the JSON, the errors, the train lines."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_models import make_model_dir
from tiny_run import write_run

from peftkit.cli import main
from peftkit.errors import ConfigError
from peftkit.training import estimate as est
from peftkit.training.config import RunConfig, apply_overrides, build_config, load_config
from peftkit.training.loop import train
from peftkit.training.memory import CATEGORIES
from peftkit.training.simulate import Simulation
from peftkit.units import format_bytes

GIB, MIB = 2**30, 2**20
LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A vocabulary and width where weights, optimizer state and activations all weigh (a few MiB each).
    directory = tmp_path_factory.mktemp("model")
    return make_model_dir(
        directory, hidden_size=128, intermediate_size=256, vocab_size=8000, max_position_embeddings=4096
    )


def raw_config(model_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model": {"name": str(model_dir)},
        "method": dict(LORA),
        "data": {"train": "not-needed.jsonl", "max_length": 64},
        "training": {"batch_size": 4},
    }
    for name, values in sections.items():
        if name == "method":  # another method's options replace lora's
            raw[name] = dict(values)
        else:
            raw.setdefault(name, {}).update(values)
    return raw


def config_of(model_dir: Path, **sections: dict[str, Any]) -> RunConfig:
    return build_config(raw_config(model_dir, **sections), data_files=False)


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def gpu_of(usable_bytes: float) -> str:
    """A --gpu size whose usable part is `usable_bytes`."""
    return f"{usable_bytes / est.USABLE / MIB:.4f}MB"


# ---- --gpu -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "nbytes"),
    [
        ("24GB", "24GB", 24 * GIB),
        ("24 GiB", "24 GiB", 24 * GIB),
        ("24", "24", 24 * GIB),
        ("16000MB", "16000MB", 16000 * MIB),
        ("1.5g", "1.5g", int(1.5 * GIB)),
        ("rtx4090", "rtx4090", 24 * GIB),
        ("NVIDIA GeForce RTX 4090", "rtx4090", 24 * GIB),
        ("A100-40GB", "a100-40gb", 40 * GIB),
        ("h100", "h100", 80 * GIB),
    ],
)
def test_gpu_sizes_and_names(text: str, name: str, nbytes: int) -> None:
    assert est.parse_gpu(text) == (name, nbytes)


@pytest.mark.parametrize("text", ["banana", "24XB", "0GB", "-8GB", ""])
def test_an_unknown_gpu_lists_the_sizes_and_names_that_work(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--gpu .* is neither a memory size .* known GPUs: rtx3060, .*rtx4090"):
        est.parse_gpu(text)


# ---- the fit, the search, the suggestions ------------------------------------------------------


def test_fits_on_either_side_of_the_limit(model_dir: Path) -> None:
    config = config_of(model_dir)
    peak = est.estimate(config).peak_bytes
    assert est.estimate(config, gpu_of(peak * 1.02)).fits is True
    below = est.estimate(config, gpu_of(peak * 0.98))
    assert below.fits is False and below.suggestions


def test_the_largest_batch_and_length_are_the_last_that_fit(model_dir: Path) -> None:
    config = config_of(model_dir)
    peak = est.estimate(config).peak_bytes
    usable = peak * 2.5
    result = est.estimate(config, gpu_of(usable))
    simulation = Simulation(config)
    batch, length = result.largest_batch_size, result.largest_max_length
    assert batch is not None and batch > 4 and length is not None and length > 64
    assert simulation.step(batch, 64).peak_bytes <= usable < simulation.step(batch + 1, 64).peak_bytes
    unit = est.sequence_unit(64)
    assert unit == 8  # 64 // 8; 128 for configs of 1024 tokens and more
    assert simulation.step(4, length).peak_bytes <= usable < simulation.step(4, length + unit).peak_bytes
    assert length % unit == 0


def test_suggestions_are_the_changed_configs_own_estimates(model_dir: Path) -> None:
    config = config_of(model_dir)
    peak = est.estimate(config).peak_bytes
    result = est.estimate(config, gpu_of(peak * 0.75))
    changes = {s.change: s for s in result.suggestions}
    singles = ["model.quantization.bits=4", "model.gradient_checkpointing=true", "training.optimizer=adamw_8bit"]
    assert list(changes)[:4] == [*singles, " ".join(singles)]
    assert any(c.startswith("data.max_length=") for c in changes)
    assert any(c.startswith("training.batch_size=") and "gradient_accumulation_steps=" in c for c in changes)
    for change, suggestion in changes.items():
        raw = raw_config(model_dir)
        overrides = change.split(" ")
        changed = build_config(apply_overrides(raw, overrides), data_files=False)
        assert suggestion.peak_bytes == est.estimate(changed).peak_bytes < peak, change
        assert suggestion.fits == (suggestion.peak_bytes <= est.parse_gpu(gpu_of(peak * 0.75))[1] * est.USABLE)
    assert changes[" ".join(singles)].peak_bytes < min(changes[c].peak_bytes for c in singles)


def test_a_config_that_fits_gets_no_suggestions(model_dir: Path) -> None:
    assert est.estimate(config_of(model_dir), "80GB").suggestions == []


def test_a_deep_model_is_searched_along_the_line_through_two_small_depths(tmp_path: Path) -> None:
    deep = make_model_dir(tmp_path, hidden_size=64, intermediate_size=128, num_hidden_layers=12)
    config = config_of(deep, model={"gradient_checkpointing": True})
    simulation = Simulation(config)
    assert simulation.num_layers == 12
    peaks = est._Peaks(config, simulation, simulation.step())
    assert peaks.by_depth  # the line meets the full simulation at the config's own batch and length
    other = Simulation(config).step(7, 96).peak_bytes
    assert peaks.peak(config, 7, 96) == pytest.approx(other, rel=0.01)


def test_the_breakdown_adds_up_and_names_each_category(model_dir: Path) -> None:
    step = est.estimate(config_of(model_dir, method={"name": "full"})).step
    assert list(step.breakdown) == list(CATEGORIES) and sum(step.breakdown.values()) == step.peak_bytes
    assert step.breakdown["base_weights"] == 128  # everything is trained: only the rotary buffer (32 float32)
    assert step.breakdown["trainable_parameters"] > 0
    tensors = len(list(Simulation(config_of(model_dir, method={"name": "full"})).model.parameters()))
    # AdamW: two float32 moments and a float32 step count per tensor
    assert step.breakdown["optimizer_state"] == 2 * step.breakdown["trainable_parameters"] + 4 * tensors


@pytest.mark.parametrize(
    ("peaks", "budget", "unit", "limit", "start"),
    [
        ([100 + 3 * x for x in range(5000)], 1000, 1, 4096, 4),
        ([100 + x * x for x in range(5000)], 10**6, 1, 4096, 1),
        ([5 + x // 7 for x in range(140000)], 10**9, 128, 131072, 2048),
        ([10 * x for x in range(200)], 5, 1, 100, 8),
        ([3 * x + (x > 500) * 500 for x in range(5000)], 2000, 1, 4096, 10),
    ],
)
def test_the_search_finds_what_trying_every_value_finds(
    peaks: list[int], budget: int, unit: int, limit: int, start: int
) -> None:
    calls: list[int] = []
    found = est._largest(lambda x: calls.append(x) or peaks[x], budget, unit, limit, start)
    assert found == max([x for x in range(unit, limit + 1, unit) if peaks[x] <= budget], default=None)
    assert len(calls) <= 16


# ---- the command -------------------------------------------------------------------------------


def test_json_holds_the_figures_and_the_fit(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_config(tmp_path / "run.yaml", raw_config(model_dir))
    assert main(["estimate", str(path), "--json", "--gpu", "1MB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {
        "peak_bytes", "breakdown", "batch_size", "max_length", "device", "num_processes", "gpu", "gpu_bytes",
        "usable_bytes", "fits", "largest_batch_size", "largest_max_length", "suggestions",
    }  # fmt: skip
    assert out["gpu_bytes"] == MIB and out["fits"] is False and sum(out["breakdown"].values()) == out["peak_bytes"]
    assert all(set(s) == {"change", "peak_bytes", "fits"} for s in out["suggestions"]) and out["suggestions"]
    assert main(["estimate", str(path), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "fits" not in plain and plain["suggestions"] == [] and plain["peak_bytes"] == out["peak_bytes"]


def test_the_report_names_the_fit_and_the_changes(model_dir: Path, tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path / "run.yaml", raw_config(model_dir))
    assert main(["estimate", str(path), "--gpu", "1MB", "--set", "training.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "batch 2 x 64 tokens" in out and "peak memory of a training step:" in out
    assert "GPU 1MB (1.0 MiB, 0.9 MiB usable): does not fit, by" in out
    assert "model.gradient_checkpointing=true:" in out


def test_data_files_need_not_exist(model_dir: Path, tmp_path: Path) -> None:
    path = write_config(tmp_path / "run.yaml", raw_config(model_dir, data={"train": "nowhere/train.jsonl"}))
    assert main(["estimate", str(path)]) == 0


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{tmp}/missing", r"model.name '.*missing': no such local directory; give a directory holding the model's"),
        ("{tmp}/empty", r"a local path without config.json"),
        ("{tmp}/alien", r"model.name '.*alien': transformers [\d.]+ cannot read its config.json: .*not-a-model"),
    ],
)
def test_models_that_cannot_be_built_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture, model: str, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text(json.dumps({"model_type": "not-a-model"}), encoding="utf-8")
    path = write_config(tmp_path / "run.yaml", {**raw_config(tmp_path), "model": {"name": model.format(tmp=tmp_path)}})
    assert main(["estimate", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("peftkit estimate: error: ")
    assert re.search(message, err), err


def test_a_hub_id_offline_and_not_cached_says_what_to_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_config(tmp_path / "run.yaml", {**raw_config(tmp_path), "model": {"name": "nobody/no-such-model"}})
    assert main(["estimate", str(path)]) == 2
    assert "neither a local directory nor a hub model in the cache" in capsys.readouterr().err


def test_a_bad_gpu_fails_before_the_simulation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_config(tmp_path / "run.yaml", {**raw_config(tmp_path), "model": {"name": str(tmp_path / "none")}})
    assert main(["estimate", str(path), "--gpu", "rtx9999"]) == 2
    assert "--gpu 'rtx9999' is neither a memory size" in capsys.readouterr().err  # not the missing model


# ---- peftkit train: the estimate first, the measured peak last ---------------------------------


def test_train_says_the_estimate_and_the_measured_step_peak(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    path = write_run(tmp_path, model_dir, training={"max_steps": 3, "batch_size": 4})
    summary = train(load_config(path)).summary
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("estimated peak memory of a training step: ")
    estimated, measured = summary["estimated_step_peak_bytes"], summary["measured_step_peak_bytes"]
    # The run's sequences are shorter than max_length, and only completions are labelled: below the estimate.
    assert 0.5 * estimated < measured <= estimated, (estimated, measured)
    # One unit (GiB/MiB) for every figure on the last line, each named; no decimal GB beside them.
    last = out[-1]
    assert f"process peak RSS {format_bytes(summary['peak_memory_bytes'])}, " in last
    assert f"training step peak {format_bytes(measured)} measured (live tensors, steps 1-2)" in last
    assert f" / {format_bytes(estimated)} estimated (full-length sequences" in last and " GB" not in last


def test_a_model_the_simulation_cannot_run_still_trains(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no fake kernel for this op")

    monkeypatch.setattr("peftkit.training.loop.Simulation", fail)
    path = write_run(tmp_path, model_dir, training={"max_steps": 1})
    summary = train(load_config(path)).summary
    assert (
        capsys.readouterr().out.splitlines()[0] == "estimate: not available (RuntimeError: no fake kernel for this op)"
    )
    assert summary["estimated_step_peak_bytes"] is None and summary["steps"] == 1


def test_the_estimate_leaves_the_run_as_it_would_be_without_it(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulation draws random numbers (its adapters' initialisation): the run's own must not move."""
    from safetensors.torch import load_file

    adapters = {}
    for name in ("with", "without"):
        if name == "without":
            monkeypatch.setattr("peftkit.training.loop.Simulation", lambda *a, **k: 1 / 0)
        path = write_run(tmp_path / name, model_dir, training={"max_steps": 2})
        train(load_config(path), quiet=True)
        adapters[name] = load_file(tmp_path / name / "run" / "adapter" / "adapter_model.safetensors")
    assert adapters["with"].keys() == adapters["without"].keys()
    for key, tensor in adapters["with"].items():
        assert torch.equal(tensor, adapters["without"][key]), key
