"""Targeting, injection, freezing, enabling: the shared machinery every method uses."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from conftest import MODEL_BUILDERS, model_output, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, train_steps
from torch import nn

import peftkit
from peftkit.errors import AdapterExistsError, TargetNotFoundError, UnsupportedModuleError
from peftkit.injection import hosts


def adapted_paths(model: nn.Module) -> list[str]:
    return [path for path, host in hosts(model) if isinstance(host, peftkit.AdapterLayer)]


def test_adapted_model_equals_base_at_init(model_name: str, ids: torch.Tensor) -> None:
    model = MODEL_BUILDERS[model_name]()
    expected = model_output(model, ids)
    peftkit.adapt(model, "lora", r=4, target_modules="all-linear")
    assert torch.equal(model_output(model, ids), expected)


def test_only_adapter_parameters_require_grad(model_name: str) -> None:
    model = peftkit.adapt(MODEL_BUILDERS[model_name](), "lora", r=4, target_modules="all-linear")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # A classification head starts random, so it trains in full (as PEFT's SEQ_CLS does).
    head = [name for name in trainable if name.startswith("classifier.")]
    assert head == (
        ["classifier.adapters.default.weight", "classifier.adapters.default.bias"] if model_name == "bert" else []
    )
    assert trainable and all(".adapters.default.lora_" in name for name in trainable if name not in head)
    count, total = peftkit.trainable_parameters(model)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())


def test_training_steps_change_output_and_leave_base_untouched(ids: torch.Tensor) -> None:
    model = tiny_llama()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.adapt(model, "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    before = model_output(model, ids).detach()
    train_steps(model, ids)
    assert (model_output(model, ids) - before).abs().max() > 1e-3
    for key, value in model.state_dict().items():
        if ".adapters." not in key:
            assert torch.equal(value, frozen[key.replace(".base_layer", "")])


def test_all_linear_excludes_output_head_and_list_matches_suffixes() -> None:
    model = peftkit.adapt(tiny_llama(), "lora", target_modules="all-linear")
    paths = adapted_paths(model)
    assert "lm_head" not in paths and len(paths) == 2 * 7
    model = peftkit.adapt(tiny_llama(), "lora", target_modules=["self_attn.q_proj", "down_proj"])
    assert adapted_paths(model) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_regex_exclude_and_layers_to_transform() -> None:
    model = peftkit.adapt(tiny_llama(), "lora", target_modules=r".*\.(q|k)_proj", exclude_modules=["k_proj"])
    assert adapted_paths(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    model = peftkit.adapt(tiny_llama(), "lora", target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    assert adapted_paths(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_default_targets_follow_the_model_type() -> None:
    assert adapted_paths(peftkit.adapt(tiny_gpt2(), "lora")) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]
    assert len(adapted_paths(peftkit.adapt(tiny_bert(), "lora"))) == 4  # query, value x 2 layers


def test_target_matching_nothing_names_modules_that_exist() -> None:
    with pytest.raises(TargetNotFoundError) as error:
        peftkit.adapt(tiny_llama(), "lora", target_modules=["query"])
    message = str(error.value)
    assert "target_modules=['query'] matched no module of LlamaForCausalLM" in message
    assert "q_proj" in message and "down_proj" in message


def test_unsupported_module_type_is_named() -> None:
    with pytest.raises(UnsupportedModuleError) as error:
        peftkit.adapt(tiny_llama(), "lora", target_modules=["input_layernorm"])
    message = str(error.value)
    assert "model.layers.0.input_layernorm" in message and "LlamaRMSNorm" in message
    assert "Linear" in message and "Embedding" in message


def test_adapting_twice_with_one_name_is_refused_and_a_second_name_stacks(ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_llama(), "lora", target_modules=["q_proj"])
    with pytest.raises(AdapterExistsError, match="already has an adapter named 'default'"):
        peftkit.adapt(model, "lora", target_modules=["q_proj"])
    peftkit.adapt(model, "lora", "second", target_modules=["q_proj", "v_proj"])
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, nn.Linear)  # wrapped once, two adapters inside
    assert sorted(q_proj.adapters) == ["default", "second"]
    assert q_proj.active_adapters == ["second"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.second." in n for n in trainable)


def test_disable_adapters_gives_base_output(ids: torch.Tensor) -> None:
    model = tiny_llama()
    expected = model_output(model, ids)
    peftkit.adapt(model, "lora", target_modules="all-linear")
    randomize_adapters(model)
    adapted = model_output(model, ids)
    assert (adapted - expected).abs().max() > 1e-3
    with peftkit.disable_adapters(model):
        assert torch.equal(model_output(model, ids), expected)
    assert torch.equal(model_output(model, ids), adapted)


def test_modules_to_save_trains_a_copy_of_the_head(ids: torch.Tensor) -> None:
    model = tiny_bert()
    head_before = model.classifier.weight.clone()
    peftkit.adapt(model, "lora", target_modules=["query", "value"], modules_to_save=["classifier"])
    assert isinstance(model.classifier, peftkit.TrainableCopy)
    assert model.classifier.adapters["default"].weight.requires_grad
    assert not model.classifier.original_module.weight.requires_grad
    model.classifier.adapters["default"].weight.data.add_(1.0)
    assert torch.equal(model.classifier.original_module.weight, head_before)
    assert torch.equal(model.classifier.weight, head_before)  # attribute access reaches the original
    logits = model_output(model, ids)
    with peftkit.disable_adapters(model):
        assert (model_output(model, ids) - logits).abs().max() > 1e-3


@pytest.mark.parametrize(("bias", "expected"), [("none", 0), ("lora_only", 4), ("all", None)])
def test_bias_policy(bias: str, expected: int | None) -> None:
    model = peftkit.adapt(tiny_bert(), "lora", target_modules=["query", "value"], bias=bias)

    def is_bias(name: str) -> bool:
        return name.endswith("bias") and not name.startswith("classifier.")  # the head trains anyway

    trainable_biases = [n for n, p in model.named_parameters() if p.requires_grad and is_bias(n)]
    if expected is None:
        expected = sum(1 for n, _ in model.named_parameters() if is_bias(n))
    assert len(trainable_biases) == expected


def test_delete_adapter_restores_plain_modules(ids: torch.Tensor) -> None:
    model = tiny_llama()
    expected = model_output(model, ids)
    peftkit.adapt(model, "lora", target_modules="all-linear")
    peftkit.delete_adapter(model, "default")
    assert adapted_paths(model) == [] and peftkit.adapter_methods(model) == {}
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.equal(model_output(model, ids), expected)


def test_generate_and_transformers_trainer_work_on_an_adapted_model(tmp_path: Path, ids: torch.Tensor) -> None:
    from transformers import Trainer, TrainingArguments

    model = peftkit.adapt(tiny_llama(), "lora", r=4, target_modules="all-linear")
    generated = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 7)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    before = {n: p.clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed == {n for n, p in model.named_parameters() if p.requires_grad}


def test_adapter_state_is_found_through_wrappers(tmp_path: Path) -> None:
    """A DDP or loss wrapper around an adapted model still answers for its adapters."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from peftkit.training.loss import CausalLMLoss

    model = peftkit.adapt(tiny_llama(), "lora", target_modules=["q_proj"])
    peftkit.adapt(model, "lora", "second", target_modules=["v_proj"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for wrapper in (CausalLMLoss(model), DistributedDataParallel(model)):
            assert peftkit.list_adapters(wrapper) == ["default", "second"]
            peftkit.set_active_adapters(wrapper, "second")
            assert [host.active_adapters for _, host in hosts(model)] == [[], ["second"]] * 2
            peftkit.set_active_adapters(wrapper, ["default", "second"])
            assert (
                peftkit.adapter_state_dict(wrapper, "second").keys()
                == peftkit.adapter_state_dict(model, "second").keys()
            )
    finally:
        dist.destroy_process_group()


def test_a_model_wrapped_by_peft_is_named_as_such() -> None:
    # It used to say "q_proj is a Linear, which this method cannot adapt".
    wrapped = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    inner = wrapped.base_model.model
    for model, found in [(wrapped, "(peft.peft_model.PeftModel)"), (inner, "(peft.tuners.lora.layer.Linear at ")]:
        with pytest.raises(peftkit.ConfigError) as error:
            peftkit.adapt(model, "lora", target_modules=["q_proj"])
        assert str(error.value).startswith(f"this model is already adapted by HF PEFT {found}")
        assert "peftkit.load_adapter(model, directory)" in str(error.value)
    assert peftkit.list_adapters(inner) == [] and type(inner.model.layers[0].self_attn.k_proj) is nn.Linear
