"""Make the quickstart's data-to-text set: restaurant attributes -> one sentence.

In the spirit of the E2E NLG challenge (Novikova et al., 2017,
https://arxiv.org/abs/1706.09254), but generated here from templates so the
project ships its own data under its own licence. Deterministic: running it
again rewrites the same train/valid/test JSONL files (prompt/completion form).

    python examples/data/make_e2e.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["make_example", "main"]

NAMES = [
    "The Eagle",
    "The Mill",
    "Blue Spice",
    "The Golden Curry",
    "Zizzi",
    "Aromi",
    "The Punter",
    "Cotto",
    "Fitzbillies",
    "The Wrestlers",
    "Alimentum",
    "Browns Cambridge",
    "Clowns",
    "Giraffe",
    "Loch Fyne",
    "Midsummer House",
    "Strada",
    "The Phoenix",
    "Wildwood",
    "The Vaults",
    "Bibimbap House",
    "The Olive Grove",
    "Green Man",
    "The Cricketers",
    "Taste of Cambridge",
    "The Plough",
    "Travellers Rest",
]
NEAR = [
    "Burger King",
    "the Crowne Plaza Hotel",
    "Café Sicilia",
    "Raja Indian Cuisine",
    "the Rice Boat",
    "Express by Holiday Inn",
    "Avalon",
    "Yippee Noodle Bar",
    "The Sorrento",
    "Ranch",
]
EAT_TYPES = ["restaurant", "pub", "coffee shop"]
FOODS = ["Italian", "French", "Chinese", "Japanese", "Indian", "English", "fast food"]
PRICES = {
    "cheap": "cheap",
    "moderate": "moderately priced",
    "high": "expensive",
    "less than £20": "priced under £20",
    "more than £30": "priced over £30",
}
RATINGS = ["low", "average", "high"]
AREAS = {"city centre": "in the city centre", "riverside": "by the riverside"}


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: 'an Indian pub', 'a cheap pub'."""
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def make_example(rng: random.Random) -> dict[str, str]:
    """One record: a bracketed meaning representation and a sentence that says all of it."""
    name, eat, food = rng.choice(NAMES), rng.choice(EAT_TYPES), rng.choice(FOODS)
    price, rating, area = rng.choice(list(PRICES)), rng.choice(RATINGS), rng.choice(list(AREAS))
    family = rng.choice(["yes", "no"])
    near = rng.choice(NEAR) if rng.random() < 0.5 else None
    fields = [
        ("name", name),
        ("eatType", eat),
        ("food", food),
        ("priceRange", price),
        ("customer rating", rating),
        ("area", area),
        ("familyFriendly", family),
    ]
    if near:
        fields.append(("near", near))
    mr = ", ".join(f"{key}[{value}]" for key, value in fields)
    kid = "family-friendly" if family == "yes" else "adults-only"
    near_part = f" near {near}" if near else ""
    where, price_words = AREAS[area] + near_part, PRICES[price]
    sentence = rng.choice(
        [
            f"{name} is {_a(price_words)}, {kid} {food} {eat} {where} with {_a(rating)} customer rating.",
            f"Located {where}, {name} is {_a(kid)} {eat} serving {price_words} {food} food, "
            f"rated {rating} by customers.",
            f"With {_a(rating)} customer rating, {name} is {_a(food)} {eat} {where}; it is {price_words} and {kid}.",
        ]
    )
    return {"prompt": f"Describe the restaurant: {mr}\nDescription:", "completion": " " + sentence}


def main(out_dir: Path = Path(__file__).parent, seed: int = 0) -> None:
    rng = random.Random(seed)
    splits = {"train": 400, "valid": 48, "test": 48}
    for split, count in splits.items():
        lines = [json.dumps(make_example(rng), ensure_ascii=False) for _ in range(count)]
        (out_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {count} examples to {out_dir / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
