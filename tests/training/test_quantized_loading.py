"""`model.quantization`: the base loads straight into 4 bits, weight by weight, and any method sits on it.

The checkpoints are tiny sharded Llamas written here (hidden 64, so bitsandbytes' CPU kernels
see in_features divisible by the blocksize 64); 4-bit models are compared in train mode with
dropout 0, where bitsandbytes' CPU path has one rounding.
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from conftest import train_steps
from tiny_models import make_model_dir
from tiny_run import write_run
from torch import nn

import peftkit
from peftkit.errors import ConfigError
from peftkit.quant import QuantizationConfig, is_quantized, quantize_model
from peftkit.training import load_config, train
from peftkit.training.models import load_model

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4}
IDS = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("sharded"), max_shard_size="100KB", **SHAPE)


def _logits(model: nn.Module) -> torch.Tensor:
    model.train()  # bitsandbytes' CPU training path: one rounding for every way of loading
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _linear_paths(model: nn.Module, kind: type) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) is kind]


def test_the_checkpoint_is_sharded(model_dir: Path) -> None:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 8


def test_loading_in_4bit_equals_quantizing_after_load(model_dir: Path) -> None:
    import bitsandbytes as bnb

    config = QuantizationConfig()
    loaded = load_model(str(model_dir), "float32", config)
    after = quantize_model(load_model(str(model_dir), "float32"), config)
    four_bit = _linear_paths(loaded, bnb.nn.Linear4bit)
    assert len(four_bit) == 4 * 7 and four_bit == _linear_paths(after, bnb.nn.Linear4bit)
    assert _linear_paths(loaded, nn.Linear) == ["lm_head"]  # the head stays dense by default
    torch.testing.assert_close(_logits(loaded), _logits(after), atol=1e-6, rtol=0)


def _live_float_bytes() -> int:
    """Bytes of every live floating-point tensor's storage, each storage once."""
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_full_precision_weights_never_exist_whole_while_loading(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted at every weight bitsandbytes quantizes: the float tensors alive at that moment."""
    seen: list[int] = []
    quantize = bnb_functional.quantize_4bit

    def counting(*args: object, **kwargs: object) -> object:
        seen.append(_live_float_bytes())
        return quantize(*args, **kwargs)

    monkeypatch.setattr(bnb_functional, "quantize_4bit", counting)
    dense_linear = 4 * (4 * 64 * 64 + 3 * 64 * 128) * 4  # bytes of the 28 linear weights in float32
    gc.collect()  # garbage of earlier tests would otherwise count, or be freed mid-load
    baseline = _live_float_bytes()
    loaded = load_model(str(model_dir), "float32", QuantizationConfig())
    assert len(seen) == 28  # one count per quantized weight
    assert max(seen) - baseline < 0.3 * dense_linear
    # The counter sees what a full-precision load holds: all of it at once.
    del loaded
    seen.clear()
    gc.collect()
    baseline = _live_float_bytes()
    dense = load_model(str(model_dir), "float32")
    quantize_model(dense, QuantizationConfig())
    assert len(seen) == 28 and seen[0] - baseline > dense_linear


@pytest.mark.parametrize("method", ["lora", "dora", "bottleneck"])
def test_methods_train_on_the_4bit_base_and_round_trip(model_dir: Path, method: str, tmp_path: Path) -> None:
    model = load_model(str(model_dir), "float32", QuantizationConfig())
    targets = ["q_proj", "v_proj", "down_proj"]
    peftkit.adapt(model, method, target_modules=targets)
    losses = train_steps(model.train(), IDS)
    assert losses[-1] < losses[0]
    expected = _logits(model)
    peftkit.save_adapter(model, tmp_path)
    fresh = load_model(str(model_dir), "float32", QuantizationConfig())
    torch.testing.assert_close(_logits(peftkit.load_adapter(fresh, tmp_path)), expected, atol=1e-6, rtol=0)
    if method == "bottleneck":  # PEFT has no bottleneck adapters to read it with
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["lm_head"],
        ),
    )
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, tmp_path)), expected, atol=1e-5, rtol=0)


def test_peftkit_train_loads_4bit_in_bfloat16_end_to_end(model_dir: Path, tmp_path: Path) -> None:
    quantization = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    config = load_config(
        write_run(tmp_path, model_dir, model={"dtype": "bfloat16", "quantization": quantization}),
        ["training.max_steps=3"],
    )
    result = train(config, quiet=True)
    model = result.model
    assert is_quantized(model) and model.lm_head.weight.dtype == torch.bfloat16
    dense = {p.dtype for n, p in model.named_parameters() if "adapters" not in n and p.is_floating_point()}
    assert dense == {torch.bfloat16}  # norms, embeddings, head: model.dtype, not cast to float32
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").open() if '"loss"' in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    saved = yaml_config(tmp_path / "run" / "config.yaml")["model"]["quantization"]
    assert saved == {**QuantizationConfig(compute_dtype="bfloat16").__dict__}


def yaml_config(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_qlora_under_train_loads_straight_into_4bit(
    model_dir: Path, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`qlora` means lora over the default 4-bit base: every linear layer but the head, at load time."""
    import peftkit.training.sharded_loading as loading  # where the loop's loading calls load_model

    loads: list[object] = []
    real = loading.load_model

    def spy(name: str, dtype: str, quantization: object, device: object) -> nn.Module:
        loads.append(quantization)
        return real(name, dtype, quantization, device)

    monkeypatch.setattr(loading, "load_model", spy)
    config = load_config(
        write_run(
            tmp_path, model_dir, model={"dtype": "bfloat16"}, method={"name": method, "target_modules": ["q_proj"]}
        )
    )
    model = train(config, quiet=True).model
    assert loads == [QuantizationConfig()]
    four_bit = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert len(four_bit) == 28  # all linear layers, not only the targeted q_proj
    assert model.model.norm.weight.dtype == torch.bfloat16  # never loaded in full precision and cast


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        (
            {"quant_type": "nf3"},
            r"model\.quantization: QuantizationConfig\.quant_type must be 'nf4' \| 'fp4', got 'nf3'",
        ),
        ({"bits": 8}, r"model\.quantization: QuantizationConfig\.bits must be 4 .*got 8"),
        ({"storage_dtype": "int8"}, r"storage_dtype must be 'float32' \| 'bfloat16' \| 'float16' \| None, got 'int8'"),
        ({"blocksize": 128}, r"model\.quantization\.blocksize 128: loading straight into 4 bits .* blocksize 64"),
        ({"quant": "nf4"}, r"model\.quantization has no option 'quant'\. Did you mean 'quant_type'\?"),
        ({"skip_modules": ".*"}, r"model\.quantization: LlamaForCausalLM has no linear layer .* outside skip_modules"),
        (
            {"skip_modules": ["nonexistent_layer"]},
            r"model\.quantization: QuantizationConfig\.skip_modules entry 'nonexistent_layer' matches no module "
            r"of LlamaForCausalLM; its linear layers are named: down_proj, gate_proj, k_proj, lm_head, o_proj",
        ),
        ({"skip_modules": "["}, r"model\.quantization: QuantizationConfig\.skip_modules '\[' is not a valid regular"),
    ],
)
def test_bad_quantization_is_refused_at_config_check(
    model_dir: Path, tmp_path: Path, quantization: dict, message: str
) -> None:
    path = write_run(tmp_path, model_dir, model={"quantization": quantization})
    with pytest.raises(ConfigError, match=message):
        load_config(path)  # the config check: no weight is read


def test_a_compute_dtype_the_device_cannot_use(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peftkit.quant.config as quant_config

    monkeypatch.setattr(quant_config, "supported_compute_dtypes", lambda device: ["float32"])
    path = write_run(tmp_path, model_dir, model={"quantization": {"compute_dtype": "bfloat16"}})
    with pytest.raises(
        ConfigError, match=r"compute_dtype 'bfloat16' cannot be used on device 'cpu'.*supports: float32"
    ):
        load_config(path)


def test_a_4bit_load_without_bitsandbytes_says_so(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for module in ("peftkit.quant", "peftkit.quant.codec", "peftkit.quant.convert"):
        monkeypatch.delitem(sys.modules, module)
    path = write_run(tmp_path, model_dir, model={"quantization": {}})
    with pytest.raises(ConfigError, match=r"model\.quantization loads the model in 4 bits, which needs bitsandbytes"):
        load_config(path)


def test_cli_generate_and_merge_load_the_base_in_4bit(model_dir: Path, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from peftkit.cli import main
    from peftkit.training.models import generate_text, load_tokenizer

    model = load_model(str(model_dir), "float32", QuantizationConfig())
    peftkit.adapt(model, "lora", target_modules="all-linear", r=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    expected_logits = _logits(model)
    peftkit.save_adapter(model, tmp_path / "adapter")
    expected_text = generate_text(model, load_tokenizer(str(model_dir)), "n=42:", 8)

    argv = ["--base", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--prompt", "n=42:"]
    assert main(["generate", *argv, "--max-new-tokens", "8", "--quantization", "nf4"]) == 0
    assert capsys.readouterr().out == expected_text + "\n"

    out = tmp_path / "merged"
    command = ["merge", str(tmp_path / "adapter"), "--out", str(out), "--base", str(model_dir)]
    assert main([*command, "--quantization", "{quant_type: nf4, double_quant: true}"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(merged.config, "quantization_config")
    torch.testing.assert_close(_logits(merged), expected_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nf3", "--quantization: QuantizationConfig.quant_type must be 'nf4' | 'fp4', got 'nf3'"),
        ("[nf4]", "--quantization takes nf4, fp4 or a mapping"),
        ("{bits: 8}", "--quantization: QuantizationConfig.bits must be 4"),
    ],
)
def test_cli_quantization_errors(model_dir: Path, spec: str, message: str, capsys) -> None:
    from peftkit.cli import main

    assert main(["generate", "--base", str(model_dir), "--prompt", "x", "--quantization", spec]) == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_pissa_over_a_4bit_load_rereads_the_checkpoint_instead_of_holding_the_base(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the init replaces layer after layer, no replaced 4-bit weight stays alive (the 8B shape would hold
    ~3.6 GB twice); when it fails at the last layer, every layer is re-quantized from the checkpoint bit for bit."""
    import bitsandbytes as bnb

    import variants.lora_init as lora_init

    model = load_model(str(model_dir), "float32", QuantizationConfig())
    layers = {path: model.get_submodule(path) for path in _linear_paths(model, bnb.nn.Linear4bit)}
    before = {
        path: (layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()) for path, layer in layers.items()
    }
    logits = _logits(model)
    replaced = [weakref.ref(layer.weight) for layer in layers.values()]
    alive: list[int] = []
    svd = lora_init.svd_factors

    def counting(*args: object, **kwargs: object) -> object:
        gc.collect()
        alive.append(sum(ref() is not None for ref in replaced))
        if len(alive) == len(layers):
            raise RuntimeError("the last layer's SVD fails")
        return svd(*args, **kwargs)

    monkeypatch.setattr(lora_init, "svd_factors", counting)
    with pytest.raises(RuntimeError, match="the last layer's SVD fails"):
        peftkit.adapt(model, "lora", target_modules="all-linear", r=4, init="pissa")
    # Before layer k's SVD, the k - 1 layers done have dropped their original 4-bit weights.
    assert alive == [len(layers) - k for k in range(len(layers))]
    for path, layer in layers.items():
        assert type(model.get_submodule(path)) is bnb.nn.Linear4bit
        assert torch.equal(layer.weight.data, before[path][0]) and torch.equal(
            layer.weight.quant_state.absmax, before[path][1]
        ), path
    torch.testing.assert_close(_logits(model), logits, atol=0, rtol=0)
