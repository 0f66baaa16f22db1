"""Data: each record shape tokenized with the promised loss mask, packing, batching, order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_tokenizer
from tiny_run import write_records

from peftkit.errors import ConfigError
from peftkit.training.config import DataConfig
from peftkit.training.data import IGNORE_INDEX, Example, collate, encode, epoch_order, load_datasets, pack, read_records


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def labelled_text(tok, example: Example) -> str:
    return tok.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_prompt_completion_loss_only_on_completion(tok) -> None:
    example = encode({"prompt": "Q: 2+2?", "completion": " A: 4"}, tok, "prompt_completion", 64)
    assert example.input_ids == tok("Q: 2+2? A: 4")["input_ids"] + [tok.eos_token_id]
    assert example.labels[:7] == [IGNORE_INDEX] * 7
    assert example.labels[7:] == example.input_ids[7:]
    assert labelled_text(tok, example) == " A: 4</s>"


def test_text_loss_everywhere_and_truncation(tok) -> None:
    example = encode({"text": "abcdef"}, tok, "text", 4)
    assert example.input_ids == example.labels == tok("abcd")["input_ids"]


def test_messages_loss_only_on_assistant_turns(tok) -> None:
    record = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok?"},
            {"role": "assistant", "content": "ok!"},
        ]
    }
    example = encode(record, tok, "messages", 128)
    assert tok.decode(example.input_ids) == "<|user|>hi</s><|assistant|>yo</s><|user|>ok?</s><|assistant|>ok!</s>"
    assert labelled_text(tok, example) == "yo</s>ok!</s>"


def test_packing_cuts_the_stream_into_full_blocks() -> None:
    examples = [Example([1, 2, 3], [-100, 2, 3]), Example([4, 5, 6, 7], [4, 5, 6, 7])]
    assert pack(examples, 3) == [Example([1, 2, 3], [-100, 2, 3]), Example([4, 5, 6], [4, 5, 6])]


def test_collate_pads_right_and_masks_padding() -> None:
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1)
    assert epoch_order(10, 0, 1) != epoch_order(10, 0, 2)
    assert sorted(epoch_order(10, 3, 0)) == list(range(10))


def test_text_file_and_validation_split(tmp_path: Path, tok) -> None:
    (tmp_path / "corpus.txt").write_text("one\n\ntwo\n\nthree\n\nfour\n", encoding="utf-8")
    assert read_records(tmp_path / "corpus.txt") == [{"text": t} for t in ("one", "two", "three", "four")]
    config = DataConfig(train=str(tmp_path / "corpus.txt"), validation_split=0.25, max_length=16)
    datasets = load_datasets(config, tok, seed=0)
    train, valid = datasets.train, datasets.validation
    assert len(train) == 3 and len(valid) == 1 and len(datasets.validation_records) == 1
    assert torch.tensor([len(e.input_ids) for e in train + valid]).sum() == len("onetwothreefour") + 4


def test_unknown_record_shape_is_named(tmp_path: Path, tok) -> None:
    path = write_records(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match=r"data.train: a record with keys \['answer', 'question'\]"):
        load_datasets(DataConfig(train=str(path)), tok, seed=0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"prompt": "p", "completion": 5}, "'completion' must be a string, got int 5."),
        ({"prompt": ["p"], "completion": "c"}, "'prompt' must be a string, got list [\"p\"]."),
        ({"text": None}, "'text' must be a string, got NoneType null."),
        ({"messages": "hi"}, "'messages' must be a list of {'role', 'content'} objects, got \"hi\"."),
        (
            {"messages": [{"role": "user", "content": "a"}, "hi"]},
            "message 2 must be an object with string 'role' and 'content', got \"hi\".",
        ),
        (
            {"messages": [{"role": "user"}]},
            "message 1 must be an object with string 'role' and 'content', got {\"role\": \"user\"}.",
        ),
        ([1, 2], "expected a JSON object, got list [1, 2]."),
    ],
)
def test_a_malformed_record_is_named_by_file_and_line(tmp_path: Path, tok, line, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"prompt": "p", "completion": "c"}\n'
    path.write_text(good + "\n" + json.dumps(line) + "\n", encoding="utf-8")  # line 3: a blank line is counted
    with pytest.raises(ConfigError) as caught:
        load_datasets(DataConfig(train=str(path)), tok, seed=0)
    assert str(caught.value) == f"{path}:3: {message}"


def test_a_data_file_that_is_not_utf8_is_named(tmp_path: Path, tok) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(
        ConfigError, match=rf"data file '{path}' is not UTF-8 text \(invalid continuation byte at byte 13\)"
    ):
        load_datasets(DataConfig(train=str(path)), tok, seed=0)


def test_a_json_file_that_is_not_json_is_named(tmp_path: Path, tok) -> None:
    path = tmp_path / "bad.json"
    path.write_text("[{", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{path} is not valid JSON: "):
        load_datasets(DataConfig(train=str(path)), tok, seed=0)


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_dropped_rows_are_counted_by_reason(tmp_path: Path, tok) -> None:
    records = [chat(("user", "hi"), ("assistant", "yo")), chat(("user", "hi")), chat(("system", "s"), ("user", "x"))]
    records.append(chat(("user", "x" * 40), ("assistant", "late")))  # 40 bytes of prompt > max_length 32
    path = write_records(tmp_path / "chat.jsonl", records)
    report = load_datasets(DataConfig(train=str(path), max_length=32), tok, seed=0).reports["train"]
    assert (report.records, report.examples) == (4, 1)
    assert report.dropped == {"no_assistant_turn": 2, "prompt_fills_max_length": 1}
    assert report.describe(32) == (
        "2 chat record(s) without an assistant turn (the loss is on assistant turns only); "
        "1 record(s) whose prompt fills data.max_length 32, leaving no token to learn"
    )


def test_packing_reports_the_cut_remainder(tmp_path: Path, tok) -> None:
    path = write_records(tmp_path / "text.jsonl", [{"text": t} for t in ("abcde", "fghij", "klmno")])  # 3 x (5 + EOS)
    datasets = load_datasets(DataConfig(train=str(path), max_length=8, packing=True), tok, seed=0)
    report = datasets.reports["train"]
    assert len(datasets.train) == report.examples == 2 and report.packing_remainder_tokens == 2
    assert report.describe(8) == "the last 2 tokens, short of a 8-token block"


@pytest.mark.parametrize(
    ("records", "config", "message"),
    [
        (
            [chat(("user", "a")), chat(("user", "b"))],
            {},
            "data.train: none of the 2 records has a token to learn from: "
            "2 chat record(s) without an assistant turn (the loss is on assistant turns only).",
        ),
        (
            [{"prompt": "p" * 20, "completion": "c"}],
            {"max_length": 16},
            "data.train: none of the 1 records has a token to learn from: 1 record(s) whose prompt fills "
            "data.max_length 16, leaving no token to learn. Raise data.max_length.",
        ),
        (
            [{"text": "abc"}, {"text": "de"}],
            {"max_length": 16, "packing": True},
            "data.train: packing joins 7 tokens, short of one data.max_length block of 16; "
            "lower data.max_length or set data.packing: false.",
        ),
    ],
)
def test_no_example_left_says_the_real_reason(tmp_path: Path, tok, records, config, message: str) -> None:
    path = write_records(tmp_path / "data.jsonl", records)
    with pytest.raises(ConfigError) as caught:
        load_datasets(DataConfig(train=str(path), **config), tok, seed=0)
    assert str(caught.value) == message
