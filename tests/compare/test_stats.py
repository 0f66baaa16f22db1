"""The comparison's statistics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from peftkit.compare.stats import bootstrap_interval, mcnemar_exact, mean_sd, paired_difference, sign_flip_test
from peftkit.compare.summary import pareto_front, summarise


def test_mean_and_sample_sd() -> None:
    assert mean_sd([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3)))
    assert mean_sd([67.8, 69.3]) == (pytest.approx(68.55), pytest.approx(1.5 / math.sqrt(2)))
    assert mean_sd([5.0]) == (5.0, None)


def test_mcnemar_exact_on_fixed_tables() -> None:
    assert mcnemar_exact(1, 9) == 22 / 1024  # 2 * (C(10,0) + C(10,1)) / 2^10
    assert mcnemar_exact(9, 1) == 22 / 1024
    assert mcnemar_exact(0, 6) == 2 / 64
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_bootstrap_interval_matches_the_exact_resampling_distribution() -> None:
    # The mean of 4 draws from [0, 0, 0, 4] is k with k ~ Binomial(4, 1/4): P(k <= 2) = 0.949, P(k <= 3) = 0.996,
    # so the 2.5% and 97.5% quantiles are 0 and 3.
    assert bootstrap_interval([0.0, 0.0, 0.0, 4.0]) == (0.0, 3.0)
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)  # means 0, 0.5, 1 with mass 1/4, 1/2, 1/4
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_sign_flip_test_enumerates_every_sign_pattern() -> None:
    assert sign_flip_test([1.0, 2.0, 3.0]) == 2 / 8  # only +++ and --- reach |mean| 2
    assert sign_flip_test([1.0, -1.0]) == 1.0
    assert sign_flip_test([0.5] * 20) == pytest.approx(1 / 20_001, abs=2e-4)  # sampled: no pattern but two is as far


def test_paired_difference_pairs_seeds_and_examples() -> None:
    # 0/1 scores, two seeds of A against the base model's one row (reused for both seeds).
    d = paired_difference([[1, 0, 1], [1, 1, 1]], [[0, 0, 1]])
    assert d.mean == pytest.approx((1 + 0.5 + 0) / 3) and d.seeds == 2 and d.examples == 3
    assert d.test == "McNemar (exact)" and d.p_value == mcnemar_exact(3, 0) == 0.25 and not d.significant
    # Continuous scores: a sign-flip test on the per-example differences.
    d = paired_difference([[3.0, 4.0, 5.0]], [[1.0, 2.0, 3.0]])
    assert (d.mean, d.low, d.high, d.test, d.p_value) == (2.0, 2.0, 2.0, "sign-flip permutation", 0.25)
    # LoRA - head from the pilot: 600 examples, 52 discordant the one way and 0 the other: significant.
    a, b = [[1] * 52 + [0] * 548], [[0] * 600]
    d = paired_difference(a, b)
    assert d.p_value == pytest.approx(2 / 2**52) and d.significant and 0.05 < d.low < d.mean < d.high < 0.12


def test_pareto_front() -> None:
    points = {"full": (70.0, 4.0), "lora": (69.0, 1.0), "dora": (69.5, 1.2), "head": (60.0, 2.0), "tie": (69.0, 1.0)}
    assert pareto_front(points) == ["full", "dora", "lora", "tie"]  # head: lora is better and cheaper


def _row(group: str, seed: int, scores: list[float], memory: float | None = 1e9) -> dict:
    return {
        "name": f"{group}-s{seed}",
        "group": group,
        "seed": seed,
        "method": group,
        "status": "ok",
        "test_scores": scores,
        "test_score": 100 * sum(scores) / len(scores),
        "measured_step_peak_bytes": memory,
        "step_time_s": 1.0,
        "trainable_params": 10,
        "forgetting_loss": 2.0 + seed,
    }


def test_summarise_groups_seeds_and_pairs_on_common_seeds() -> None:
    rows = [
        {**_row("base", 0, [0, 0, 0, 1], None), "forgetting_loss": 2.0},
        _row("lora", 0, [1, 1, 0, 1]),
        _row("lora", 1, [1, 1, 1, 1]),
        _row("dora", 1, [1, 0, 0, 1]),  # seed 0 failed: pairs with lora's seed 1 only
        {"name": "dora-s0", "group": "dora", "seed": 0, "method": "dora", "status": "failed"},
    ]
    comparison = summarise(rows, "label")
    assert [m.name for m in comparison.methods] == ["lora", "dora", "base"]  # 87.5, 50, 25
    lora = comparison.methods[0]
    assert lora.quality == (87.5, pytest.approx(math.sqrt(2 * 12.5**2)))
    assert lora.forgetting == (0.5, pytest.approx(math.sqrt(0.5)))  # 2 - 2 and 3 - 2
    assert lora.memory_gb == (1.0, 0.0) and lora.seeds == [0, 1]
    assert comparison.pair("lora", "dora").mean == pytest.approx(0.5) and comparison.pair("lora", "dora").seeds == 1
    assert comparison.pair("lora", "base").mean == pytest.approx((1 + 1 + 0.5 + 0) / 4)
