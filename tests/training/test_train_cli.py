"""`peftkit train` from the command line: what goes wrong ends in one line on stderr and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_run import make_model_dir, write_records, write_run

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
