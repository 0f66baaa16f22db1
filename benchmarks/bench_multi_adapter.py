"""Many adapters on one base: mixed-batch throughput, merged latency, switching time.

Compares, in one process on one machine, peftkit against HF PEFT on the Llama-shaped
benchmark model with four LoRA adapters:

- a mixed batch of 8 rows over 4 adapters (peftkit.mixed_batch vs PEFT's `adapter_names`),
  and the same rows as 4 separate single-adapter batches;
- a merged model's latency against the plain base model's;
- the time to switch the merged adapter (unmerge old, merge new).

    python benchmarks/bench_multi_adapter.py [--layers 8] [--seq 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import tempfile
from pathlib import Path

import peft
import torch
from common import interleaved_medians, llama_model, machine, median_seconds

import peftkit

ADAPTERS = ["a0", "a1", "a2", "a3"]
ROWS = ["a0", "a1", "a2", "a3", "a0", "a1", "a2", "a3"]


def build(args: argparse.Namespace, workdir: Path) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    base = llama_model(num_hidden_layers=args.layers)
    plain = copy.deepcopy(base)
    ours = base
    for seed, name in enumerate(ADAPTERS):
        peftkit.adapt(ours, "lora", name, r=args.rank, alpha=2 * args.rank, target_modules="all-linear")
        with torch.no_grad():
            for param in ours.parameters():
                if param.requires_grad:
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
        peftkit.save_adapter(ours, workdir / name, name)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), workdir / ADAPTERS[0], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        theirs.load_adapter(workdir / name, adapter_name=name)
    return plain, ours, theirs.eval()


@torch.inference_mode()
def run(args: argparse.Namespace) -> list[tuple[str, float, float | None]]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        plain, ours, theirs = build(args, Path(tmp))
    ids = torch.randint(0, 32000, (len(ROWS), args.seq))

    def ours_mixed() -> torch.Tensor:
        with peftkit.mixed_batch(ours, ROWS):
            return ours(input_ids=ids).logits

    def ours_separate() -> None:
        for name in ADAPTERS:
            peftkit.set_active_adapters(ours, name)
            ours(input_ids=ids[[i for i, r in enumerate(ROWS) if r == name]])

    def theirs_mixed() -> torch.Tensor:
        return theirs(input_ids=ids, adapter_names=ROWS).logits

    torch.testing.assert_close(ours_mixed(), theirs_mixed(), atol=1e-4, rtol=1e-4)  # same numbers first
    results: list[tuple[str, float, float | None]] = []
    rows_per_run = len(ROWS) * args.seq
    t_ours, t_sep, t_theirs, t_plain = interleaved_medians(
        [ours_mixed, ours_separate, theirs_mixed, lambda: plain(input_ids=ids)], args.repeats
    )
    results.append(("mixed batch, peftkit (tokens/s)", rows_per_run / t_ours, None))
    results.append(("mixed batch, HF PEFT adapter_names (tokens/s)", rows_per_run / t_theirs, None))
    results.append(("4 separate single-adapter batches, peftkit (tokens/s)", rows_per_run / t_sep, None))
    results.append(("base model alone, no adapter work (tokens/s)", rows_per_run / t_plain, None))
    results.append(("throughput ratio peftkit mixed / PEFT mixed", t_theirs / t_ours, 1.2))
    # An adapter path that cost nothing would reach this ratio: the base model's own time bounds it.
    results.append(("ceiling: base alone / PEFT mixed", t_theirs / t_plain, None))
    results.append(("throughput ratio peftkit mixed / separate batches", t_sep / t_ours, None))

    one = ids[:1]
    peftkit.switch_merged_adapter(ours, "a0")
    theirs.merge_adapter(["a0"])
    unloaded = peftkit.merge_and_unload(copy.deepcopy(ours))
    t_merged, t_base, t_theirs_merged, t_unloaded = interleaved_medians(
        [lambda m=m: m(input_ids=one) for m in (ours, plain, theirs, unloaded)], args.repeats * 3
    )
    results.append(("merged model latency / base model latency, peftkit", t_merged / t_base, 1.0))
    results.append(("merged model latency / base model latency, HF PEFT", t_theirs_merged / t_base, None))
    results.append(("merge_and_unload latency / base model latency, peftkit", t_unloaded / t_base, 1.0))

    cycle = iter(range(10**6))
    t_switch = median_seconds(lambda: peftkit.switch_merged_adapter(ours, ADAPTERS[next(cycle) % 4]), args.repeats * 2)

    def theirs_switch() -> None:
        theirs.unmerge_adapter()
        name = ADAPTERS[next(cycle) % 4]
        theirs.set_adapter(name)
        theirs.merge_adapter([name])

    t_theirs_switch = median_seconds(theirs_switch, args.repeats * 2)
    results.append(("switch merged adapter, peftkit (ms)", 1000 * t_switch, None))
    results.append(("switch merged adapter, HF PEFT (ms)", 1000 * t_theirs_switch, None))
    results.append(("switch time ratio peftkit / PEFT", t_switch / t_theirs_switch, None))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = run(args)
    print(f"# multi-adapter benchmark, {datetime.date.today()}, {machine()}, peft {peft.__version__}")
    print(
        f"# Llama-shaped (hidden 1024, {args.layers} layers, vocab 32000), 4 LoRA adapters r={args.rank} all-linear, "
        f"batch {len(ROWS)} x seq {args.seq}, median of {args.repeats}, timed in turn"
    )
    print("| measure | value | target |\n| --- | --- | --- |")
    for name, value, target in results:
        verdict = (
            ""
            if target is None
            else (f">= {target}: {'holds' if value >= target else 'misses'}" if "throughput" in name else f"~{target}")
        )
        print(f"| {name} | {value:.3f} | {verdict} |")


if __name__ == "__main__":
    main()
