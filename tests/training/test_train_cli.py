"""`peftkit train` from the command line: what goes wrong ends in one line on stderr and exit status 2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tiny_models import make_model_dir
from tiny_run import write_records, write_run

from peftkit.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def fails_in_one_line(argv: list[str], capsys) -> str:
    """Run `peftkit ARGV`, assert exit status 2 and one stderr line; return that line's message."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("peftkit train: error: "), captured.err
    return captured.err.removeprefix("peftkit train: error: ").rstrip("\n")


def test_a_malformed_record_names_file_and_line(tmp_path: Path, model_dir: Path, capsys) -> None:
    config = write_run(tmp_path, model_dir)
    data = tmp_path / "train.jsonl"
    write_records(data, [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 7}])
    message = fails_in_one_line(["train", str(config)], capsys)
    assert message == f"{data}:2: 'completion' must be a string, got int 7."
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_utf8_is_named(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_bytes(b"model:\n  name: \xff\n")
    assert fails_in_one_line(["train", str(config)], capsys).startswith(f"config file '{config}' is not UTF-8 text")


def test_offline_a_hub_id_not_in_the_cache_fails_at_once(tmp_path: Path, model_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    config = write_run(tmp_path, model_dir, model={"name": "nobody/no-such-model-peftkit"})
    started = time.perf_counter()
    message = fails_in_one_line(["train", str(config)], capsys)
    assert time.perf_counter() - started < 3.0
    assert message == (
        "model.name 'nobody/no-such-model-peftkit' is neither a local directory nor a hub model in the cache, "
        "and HF_HUB_OFFLINE=1 forbids downloading it; download it first, or give a local path."
    )


def test_a_local_model_path_that_does_not_exist(tmp_path: Path, model_dir: Path, capsys) -> None:
    config = write_run(tmp_path, model_dir, model={"name": str(tmp_path / "models" / "mine")})
    message = fails_in_one_line(["train", str(config)], capsys)
    assert message == (
        f"model.name '{tmp_path / 'models' / 'mine'}': no such local directory; give a directory holding the "
        "model's config.json, a hub id (namespace/name), or 'gemma-3-270m' (the embedded default)."
    )


def test_a_hub_that_cannot_be_reached_is_named(tmp_path: Path, model_dir: Path, capsys, monkeypatch) -> None:
    import transformers

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    config = write_run(tmp_path, model_dir, model={"name": "nobody/no-such-model-peftkit"})
    assert fails_in_one_line(["train", str(config)], capsys) == (
        "model.name 'nobody/no-such-model-peftkit': could not load it from the Hugging Face hub (or its cache): "
        "We couldn't connect to 'https://huggingface.co' to load the files."
    )


def test_a_local_directory_without_a_model_is_named(tmp_path: Path, model_dir: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    config = write_run(tmp_path, model_dir, model={"name": str(tmp_path / "empty")})
    message = fails_in_one_line(["train", str(config)], capsys)
    assert (
        message == f"model.name '{tmp_path / 'empty'}': a local path without config.json, so not a transformers model."
    )
