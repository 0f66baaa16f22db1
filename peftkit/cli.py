"""The `peftkit` command: train, estimate, generate, merge, methods, inspect, analyze, compare.

Every error peftkit raises on purpose (a bad config key, a missing file, an
unknown method) ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.errors import ConfigError, DestinationError, MergeError, PeftkitError
from peftkit.files import atomic_directory, check_writable, destination_errors
from peftkit.method import AdapterMethod
from peftkit.quant.config import QuantizationConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["main", "build_parser"]


def _train(args: argparse.Namespace) -> None:
    from peftkit.training.config import load_config
    from peftkit.training.loop import train

    config = load_config(args.config, args.set)  # all validation happens here, before any model loads
    train(config, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)


QUANTIZATION_HELP = "load the base straight into 4 bits: nf4, fp4, or a YAML mapping of model.quantization's fields"


def _quantization(text: str | None) -> QuantizationConfig | None:
    """`--quantization`: a quant_type (nf4, fp4) or a YAML mapping of `model.quantization`'s fields."""
    if text is None:
        return None
    import yaml

    from peftkit.training.quantized import quantization_from_options

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--quantization {text!r} is not YAML: {error}") from None
    options = {"quant_type": value} if isinstance(value, str) else value
    if not isinstance(options, dict):
        raise ConfigError(
            f"--quantization takes nf4, fp4 or a mapping such as '{{quant_type: nf4, compute_dtype: bfloat16}}', "
            f"got {text!r}."
        )
    return quantization_from_options(options, "--quantization")


def _generate(args: argparse.Namespace) -> None:
    from peftkit.loading import load_adapter
    from peftkit.peft_format import read_adapter_config
    from peftkit.training.models import generate_text, load_model, load_tokenizer

    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}.")
    quantization = _quantization(args.quantization)
    if args.adapter:  # a wrong directory is named before the model loads
        read_adapter_config(args.adapter)
    tokenizer = load_tokenizer(args.base)
    if not tokenizer(args.prompt)["input_ids"]:
        raise ConfigError(f"--prompt {args.prompt!r} gives no tokens to continue; give some text.")
    model = load_model(args.base, quantization=quantization)
    if args.adapter:
        load_adapter(model, args.adapter)
    print(generate_text(model, tokenizer, args.prompt, args.max_new_tokens))


def _merge(args: argparse.Namespace) -> None:
    from peftkit.loading import load_adapter
    from peftkit.peft_format import read_adapter_config
    from peftkit.training.models import load_model, load_tokenizer

    quantization = _quantization(args.quantization)
    config = read_adapter_config(args.adapter_dir)  # a wrong directory is named before anything loads
    base = args.base or config.get("base_model_name_or_path")
    if not base:
        raise PeftkitError(f"{args.adapter_dir} does not name its base model; pass --base MODEL.")
    out = Path(args.out)
    _check_destination(out, {"the base model": Path(base), "the adapter": Path(args.adapter_dir)}, args.force)
    check_writable(out)  # before minutes of loading
    base_model = load_model(base, quantization=quantization)
    dtype = base_model.dtype  # a 4-bit base comes back dense in the dtype it was loaded in
    model = _merged(load_adapter(base_model, args.adapter_dir), dtype)
    tokenizer = load_tokenizer(base)
    with destination_errors(out), atomic_directory(out, replace=args.force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged {args.adapter_dir} into {base}: {args.out}")


def _merged(model: Any, dtype: torch.dtype) -> Any:
    """The plain model transformers loads as it is: a 4-bit base (qlora, qdora) is merged dense.

    `merge_and_unload` keeps 4-bit layers 4-bit, as PEFT does; written out, those are
    packed tensors with no quantization config, which no loader reads.
    """
    from peftkit.merge import merge_and_unload

    if getattr(model, "is_loaded_in_4bit", False):
        from peftkit.quant import merge_and_dequantize

        model = merge_and_dequantize(model, dtype)
    else:
        model = merge_and_unload(model)
    packed = [name for name, param in model.named_parameters() if not param.is_floating_point()]
    if packed:
        raise MergeError(
            f"the merged model still holds non-float (quantized) weights, e.g. {packed[:3]}, "
            "which transformers cannot load without their quantization config; nothing was written."
        )
    return model


def _check_destination(out: Path, inputs: dict[str, Path], force: bool) -> None:
    """Refuse an --out that is a file, holds an input, or is a directory in use (unless --force)."""
    if out.exists() and not out.is_dir():
        raise DestinationError(f"--out {str(out)!r} is an existing file; give a directory.")
    for what, path in inputs.items():
        if path.exists() and path.resolve().is_relative_to(out.resolve()):
            raise DestinationError(
                f"--out {str(out)!r} holds {what} ({str(path)!r}), which writing there would overwrite; "
                "choose another directory."
            )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DestinationError(
            f"--out {str(out)!r} already exists and is not empty; "
            "pass --force to replace it, or choose another directory."
        )


def _methods(args: argparse.Namespace) -> None:
    from peftkit.registry import available_methods, get_method

    for name in available_methods():
        method = get_method(name)
        print(f"{name:<8} {method.description}")
        for field in dataclasses.fields(method.config_class):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
            print(f"           {field.name} = {default!r}")


def _inspect(args: argparse.Namespace) -> None:
    from peftkit.peft_format import (
        CONFIG_NAME,
        WEIGHTS_NAME,
        method_from_config,
        read_adapter_config,
        read_adapter_tensors,
    )

    directory = Path(args.adapter_dir)
    weights = directory / WEIGHTS_NAME
    tensors, metadata = read_adapter_tensors(weights)  # first: a directory holding only a .bin is told so
    config = read_adapter_config(directory)
    method = method_from_config(config, metadata, directory / CONFIG_NAME)
    rank = getattr(method.config, "r", None)
    print(f"method:     {method.name}" + (f" (r={rank})" if rank is not None else ""))
    print(f"base model: {config.get('base_model_name_or_path')}")
    print(f"targets:    {json.dumps(config.get('target_modules'))}")
    print(f"parameters: {sum(t.numel() for t in tensors.values()):,}")
    print(f"size:       {weights.stat().st_size / 1e6:.2f} MB ({weights.name})")


# Prompts for the logit change of a truncated adapter when none are given: short, of different kinds.
TRUNCATE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "name[The Eagle], eatType[coffee shop], food[Japanese], priceRange[moderate]",
)


def _analyze(args: argparse.Namespace) -> None:
    from peftkit.analysis import analyze, check_intruder_options, describe_analysis, read_low_rank_adapter
    from peftkit.truncation import check_truncation, truncate_adapter

    if (args.truncate is None) != (args.out is None):
        raise ConfigError("--truncate K and --out DIR go together: give both to write a truncated adapter.")
    if args.prompt and args.truncate is None:
        raise ConfigError("--prompt is for the logit change of --truncate; give --truncate K --out DIR too.")
    check_intruder_options(args.intruder_k, args.intruder_threshold)
    source = read_low_rank_adapter(args.adapter)  # a wrong or non-LoRA adapter fails before any model loads
    against = read_low_rank_adapter(args.against) if args.against else None
    if args.truncate is not None:
        check_truncation(source, args.truncate)
        _check_destination(Path(args.out), {"the adapter": Path(args.adapter)}, args.force)
        check_writable(args.out)  # before the base loads
    base = _analysis_base(args.base, source.method) if args.base else None
    result = analyze(
        source,
        base=base,
        against=against,
        intruder_k=args.intruder_k,
        intruder_threshold=args.intruder_threshold,
    )
    if args.truncate is not None:
        with destination_errors(args.out):
            truncate_adapter(source, args.truncate, args.out)
        result["truncation"] = {"rank": args.truncate, "out": args.out}
        if base is not None:
            result["truncation"]["logit_change"] = _truncation_logits(base, args)
    if args.plots:
        from peftkit.compare.analysis import write_analysis_plots

        result["plots"] = write_analysis_plots(result, Path(args.plots))
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(describe_analysis(result)))


def _analysis_base(name: str, method: AdapterMethod) -> nn.Module:
    """The base model for `--base`, in 4 bits when the adapter was trained over a 4-bit base (qlora, qdora)."""
    from peftkit.training.models import load_model

    return load_model(name, quantization=method.base_quantization()).eval()


def _truncation_logits(base: Any, args: argparse.Namespace) -> dict[str, Any]:
    from peftkit.training.models import load_tokenizer
    from peftkit.truncation import logit_change

    tokenizer = load_tokenizer(args.base)
    inputs = [tokenizer(text, return_tensors="pt")["input_ids"][0] for text in args.prompt or TRUNCATE_PROMPTS]
    return logit_change(base, args.adapter, args.out, inputs)


def _estimate(args: argparse.Namespace) -> None:
    from peftkit.training.config import load_config
    from peftkit.training.estimate import describe, estimate, parse_gpu

    if args.gpu:
        parse_gpu(args.gpu)  # a bad --gpu fails before anything is read
    config = load_config(args.config, args.set, data_files=False)
    result = estimate(config, args.gpu, args.device, args.num_processes)
    print(json.dumps(result.to_json()) if args.json else "\n".join(describe(result, config)))


def _compare(args: argparse.Namespace) -> None:
    from peftkit.compare import compare

    compare(args.config, args.set, args.methods, args.ranks, args.targets, args.out, seeds=args.seeds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune as a YAML config says")
    train.add_argument("config", help="the run's YAML file")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help="continue from the newest checkpoint (of the run, or under DIR)",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="delete the run already in output.dir (refused otherwise)"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    train.set_defaults(run=_train)

    generate = commands.add_parser("generate", help="greedy text from a base model, with an adapter if given")
    generate.add_argument("--base", required=True, help="hub id, local path, or gemma-3-270m")
    generate.add_argument("--adapter", help="an adapter directory")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--quantization", metavar="SPEC", help=QUANTIZATION_HELP)
    generate.set_defaults(run=_generate)

    merge = commands.add_parser("merge", help="write base + adapter as one plain transformers model")
    merge.add_argument("adapter_dir")
    merge.add_argument("--out", required=True, help="output directory")
    merge.add_argument("--base", help="base model (default: the one the adapter names)")
    merge.add_argument("--force", action="store_true", help="replace --out if it is an existing directory")
    merge.add_argument("--quantization", metavar="SPEC", help=QUANTIZATION_HELP + " (merged, then written dense)")
    merge.set_defaults(run=_merge)

    methods = commands.add_parser("methods", help="list registered methods and their options")
    methods.set_defaults(run=_methods)

    inspect = commands.add_parser("inspect", help="describe an adapter directory")
    inspect.add_argument("adapter_dir")
    inspect.set_defaults(run=_inspect)

    estimate = commands.add_parser(
        "estimate", help="the peak memory of the config's training step, simulated; with --gpu, whether it fits"
    )
    estimate.add_argument("config", help="the run's YAML file (its data files need not exist)")
    estimate.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key")
    estimate.add_argument("--gpu", help="a memory size (24GB, 16GiB, 12000MB) or a GPU's name (rtx4090, a100-40gb)")
    estimate.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="the device the run trains on (default cuda)"
    )
    estimate.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="the peak of one of N processes under training.distributed (fsdp shards; --gpu is per process)",
    )
    estimate.add_argument("--json", action="store_true", help="print one JSON object (bytes)")
    estimate.set_defaults(run=_estimate)

    analyze = commands.add_parser(
        "analyze", help="what a LoRA-family adapter learned: spectra, effective ranks, amplification, similarity"
    )
    analyze.add_argument("adapter", help="an adapter directory (peftkit's or HF PEFT's LoRA format)")
    analyze.add_argument("--base", help="the base model (hub id, local path, gemma-3-270m): amplification, intruders")
    analyze.add_argument("--against", metavar="ADAPTER2", help="a second adapter of the same base: subspace similarity")
    analyze.add_argument("--json", action="store_true", help="print one JSON object")
    analyze.add_argument("--plots", metavar="DIR", help="write PNG plots (spectra, similarity, effective rank) there")
    analyze.add_argument("--truncate", type=int, metavar="K", help="write the adapter cut to rank K by SVD to --out")
    analyze.add_argument("--out", metavar="DIR", help="where --truncate writes (a PEFT LoRA adapter)")
    analyze.add_argument("--force", action="store_true", help="replace --out if it is an existing directory")
    analyze.add_argument(
        "--prompt", action="append", help="a prompt for --truncate's logit change with --base (repeatable)"
    )
    analyze.add_argument("--intruder-k", type=int, default=10, help="top singular vectors checked (default 10)")
    analyze.add_argument(
        "--intruder-threshold", type=float, default=0.5, help="cosine below which one is an intruder (default 0.5)"
    )
    analyze.set_defaults(run=_analyze)

    compare = commands.add_parser("compare", help="train methods x ranks x target sets side by side; write a report")
    compare.add_argument("config", help="the runs' YAML file (its compare: section says the same as the flags)")
    compare.add_argument("--methods", help="comma-separated method names, e.g. lora,dora,qlora,qdora")
    compare.add_argument("--ranks", help="comma-separated values of r, e.g. 4,16")
    compare.add_argument("--targets", help="comma-separated target sets: attn, all-linear, or q_proj+v_proj")
    compare.add_argument("--seeds", type=int, metavar="N", help="run every method with seeds 0..N-1")
    compare.add_argument("--out", help="output directory (default runs/compare)")
    compare.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key")
    compare.set_defaults(run=_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `peftkit` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except PeftkitError as error:
        print(f"peftkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
