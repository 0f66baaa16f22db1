"""Memory-saving training options give the same loss and gradients for fewer counted tensor bytes.

Bytes are counted by `LiveBytes`, not read from the process RSS. torch's own
`torch.distributed._tools.mem_tracker.MemTracker` counts the same thing, but (torch
2.13) it puts a gradient hook on every parameter of every module it sees and
raises on frozen ones, which every adapted model has.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from safetensors.torch import load_file
from tiny_models import make_model_dir
from tiny_run import write_run
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import peftkit
from peftkit.activations import enable_gradient_checkpointing
from peftkit.errors import ConfigError
from peftkit.quant import QuantizationConfig, codec, quantize_model
from peftkit.quant.codec import is_quantized
from peftkit.training.config import TrainingConfig, load_config
from peftkit.training.loop import train
from peftkit.training.loss import CausalLMLoss, head_cross_entropy, loss_chunk_size


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops inside the mode allocated and that are still alive; and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, pointer: int) -> None:
        self.live -= self._sizes.pop(pointer)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Storages are told apart by their C++ object (`_cdata`): on the meta device every data_ptr is 0.
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer = storage._cdata
            if pointer in inputs or pointer in self._sizes or not storage.nbytes():  # a view, in place, or empty
                continue
            self._sizes[pointer] = storage.nbytes()
            self.live += storage.nbytes()
            weakref.finalize(storage, self._free, pointer)
        self.peak = max(self.peak, self.live)
        return out


def test_live_bytes_counts_what_is_alive() -> None:
    x = torch.randn(1000, 1000)
    with LiveBytes() as counter:
        y = (x * 2).exp()  # a 4 MB temporary, then a 4 MB result
        alive = counter.live
        del y
    assert (alive, counter.live, counter.peak) == (4_000_000, 0, 8_000_000)


# ---- chunked cross-entropy over the head -------------------------------------------------

VOCAB = 32768  # the automatic rule's threshold: chunks of 2**25 // 32768 = 1024 positions


def big_vocab_llama(tied: bool = False) -> nn.Module:
    model = tiny_llama(0, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, tie_word_embeddings=tied).train()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def gemma_softcapped() -> nn.Module:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        final_logit_softcapping=30.0,  # Gemma 2's value; Gemma 3 ships None, so set it to test the path
        sliding_window=8,
    )
    return Gemma3ForCausalLM(config).train()


def four_bit_head() -> nn.Module:
    model = quantize_model(big_vocab_llama(), QuantizationConfig(skip_modules=[]))
    assert is_quantized(model.lm_head)  # the head is 4-bit too
    return model


# name -> (model builder, method options): every kind of head the loss must call as a module.
HEADS: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "lora_on_head": (big_vocab_llama, {"name": "lora", "target_modules": ["q_proj", "lm_head"], "r": 4}),
    "dropout_on_head": (big_vocab_llama, {"name": "lora", "target_modules": ["lm_head"], "dropout": 0.5}),
    "trainable_copy": (big_vocab_llama, {"name": "lora", "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "tied_full": (lambda: big_vocab_llama(tied=True), {"name": "full"}),
    "softcap": (gemma_softcapped, {"name": "lora", "target_modules": ["q_proj", "lm_head"], "r": 4}),
    "four_bit": (four_bit_head, {"name": "lora", "target_modules": ["q_proj", "lm_head"], "r": 4}),
}


def batch(seed: int = 0, rows: int = 2, length: int = 24) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt: no logits there
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_and_grads(model: nn.Module, chunk_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks in both runs: the recompute must replay them
    loss = CausalLMLoss(model, chunk_size)(**batch())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_chunked_loss_has_the_same_loss_and_gradients(kind: str) -> None:
    build, options = HEADS[kind]
    model = build()
    peftkit.adapt(model, options["name"], **{k: v for k, v in options.items() if k != "name"})
    randomize_adapters(model)
    loss, grads = loss_and_grads(model, 0)
    chunked_loss, chunked_grads = loss_and_grads(model, 7)  # 7 does not divide the 42 labelled positions
    assert abs(chunked_loss.item() - loss.item()) <= 1e-5
    assert grads.keys() == chunked_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_chunked_loss_lowers_the_peak_bytes_of_forward_and_backward() -> None:
    """The unchunked loss holds 3 N V float32 at its peak (logits, log-softmax, its gradient); chunks hold 3 C V."""
    model = big_vocab_llama()
    peftkit.adapt(model, "lora", target_modules=["q_proj", "lm_head"], r=4)
    inputs = batch(rows=4, length=64)  # 251 labelled positions: logits of 251 x 32768 float32 are 32.9 MB

    def peak(chunk_size: int) -> int:
        with LiveBytes() as counter:
            CausalLMLoss(model, chunk_size)(**inputs).backward()
        return counter.peak

    unchunked, chunked = peak(0), peak(32)
    # measured: 99.3 MB -> 14.8 MB (a chunk's logits are 32 x 32768 x 4 = 4.2 MB)
    assert unchunked > 3 * 32.9e6 and chunked < 0.2 * unchunked, (unchunked, chunked)


def test_chunked_loss_on_gemma_3_270m_shape() -> None:
    """Gemma-3-270M's head (262144 x 640, from its config, on the meta device) for batch 8 x seq 256.

    Only the loss differs between the two, so it is measured alone (the body's bytes are the same).
    """
    config = Gemma3TextConfig(vocab_size=262144, hidden_size=640, num_hidden_layers=1, head_dim=256)
    with torch.device("meta"):
        head = Gemma3ForCausalLM(config).lm_head.requires_grad_(False)  # tied to the frozen embeddings under LoRA
        hidden = torch.empty(8 * 255, 640, requires_grad=True)
        targets = torch.zeros(8 * 255, dtype=torch.long)
    chunk = loss_chunk_size(None, config.vocab_size)
    peaks = []
    for size in (0, chunk):
        with LiveBytes() as counter:
            head_cross_entropy(head, hidden, targets, config.final_logit_softcapping, size).backward()
        peaks.append(counter.peak / 2**30)
    # measured: 5.98 GiB unchunked (logits, log-softmax, its gradient: 3 x 2040 x 262144 float32) -> 0.38 GiB
    assert chunk == 128 and peaks[0] > 5.9 and peaks[1] < 0.39, peaks


def test_loss_chunk_size_rule() -> None:
    assert loss_chunk_size(None, 32767) == 0  # small vocabularies: off
    assert loss_chunk_size(None, 32768) == 1024 and loss_chunk_size(None, 262144) == 128  # 2**25 logits a chunk
    assert loss_chunk_size(0, 262144) == 0 and loss_chunk_size(100, 128) == 100  # as configured
    with pytest.raises(ConfigError, match=r"training.loss_chunk_size must be 0 or more \(or null\), got -1"):
        TrainingConfig(loss_chunk_size=-1)


# ---- gradient checkpointing over every method, float32 and 4-bit bases ----------------------

BASES = ["float32", "4-bit"]


def checkpointing_case(method: str, base: str, checkpointing: dict[str, Any] | None) -> tuple[dict, int, int]:
    """Gradients, bytes alive after forward (the activations kept for backward) and the peak over both."""
    model = tiny_llama(
        0, hidden_size=64, intermediate_size=256, vocab_size=256, num_hidden_layers=3, tie_word_embeddings=False
    ).train()
    if base == "4-bit":
        assert is_quantized(quantize_model(model).model.layers[0].mlp.up_proj)
    peftkit.adapt(model, method)
    randomize_adapters(model)
    if checkpointing is not None:
        enable_gradient_checkpointing(model, checkpointing)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with LiveBytes() as counter:
        loss = model(input_ids=ids, labels=ids).loss
        saved = counter.live
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, saved, counter.peak


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", peftkit.available_methods())
def test_gradient_checkpointing_same_gradients_fewer_activation_bytes(method: str, base: str) -> None:
    if method == "full" and base == "4-bit":  # the one pair that cannot train: 4-bit weights have no gradient
        with pytest.raises(peftkit.UnsupportedModuleError, match="full cannot train non-floating-point"):
            checkpointing_case(method, base, None)
        return
    plain, plain_saved, plain_peak = checkpointing_case(method, base, None)
    grads, saved, peak = checkpointing_case(method, base, {})
    assert grads.keys() == plain.keys() and all(g is not None for g in grads.values())
    for name, grad in plain.items():  # measured: bit-identical; the recompute replays the same ops
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=0, msg=name)
    # measured, float32 and 4-bit alike (bytes alive after forward; peak over forward and backward):
    # lora 1.94 MB -> 0.27 MB, peak 2.20 -> 1.10; dora 2.10 -> 0.27, peak 2.36 -> 1.15; bottleneck like lora;
    # full 2.71 -> 0.34, peak 2.97 -> 1.75; head keeps only the head's input either way, peak 0.63 -> 0.53
    if method == "head":
        assert saved == plain_saved and peak < 0.9 * plain_peak, (saved, plain_saved, peak, plain_peak)
    else:
        assert saved < 0.16 * plain_saved and peak < 0.65 * plain_peak, (saved, plain_saved, peak, plain_peak)


def test_non_reentrant_checkpointing_keeps_the_frozen_body_out_of_backward() -> None:
    """transformers >= 5 makes the embeddings' output require grad: for `head`, a backward through the whole body."""
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    outputs = []
    for switch in (lambda m: m.gradient_checkpointing_enable(), enable_gradient_checkpointing):
        model = tiny_llama(0, vocab_size=256, tie_word_embeddings=False).train()
        peftkit.adapt(model, "head")
        switch(model)
        outputs.append(model.model.embed_tokens(ids).requires_grad)
    assert outputs == [True, False]  # transformers' own switch, then ours


def test_reentrant_checkpointing_needs_and_gets_grad_requiring_inputs() -> None:
    plain, _, _ = checkpointing_case("lora", "4-bit", None)
    grads, _, _ = checkpointing_case("lora", "4-bit", {"use_reentrant": True})
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=0, msg=name)


def test_train_with_checkpointing_and_a_chunked_loss_learns_the_same_adapter(tmp_path: Path) -> None:
    """The config keys reach the loop: 3 steps with both options give the adapter of 3 steps without."""
    model_dir = make_model_dir(tmp_path / "model")
    plain = train(load_config(write_run(tmp_path / "plain", model_dir, training={"max_steps": 3})), quiet=True)
    saving = train(
        load_config(
            write_run(
                tmp_path / "saving",
                model_dir,
                model={"gradient_checkpointing": True},
                training={"max_steps": 3, "loss_chunk_size": 5},
            )
        ),
        quiet=True,
    )
    assert abs(plain.summary["val_loss"] - saving.summary["val_loss"]) < 1e-5  # measured: 4.8e-7
    expected = load_file(tmp_path / "plain" / "run" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "saving" / "run" / "adapter" / "adapter_model.safetensors")
    # measured: within 1.3e-5 after 3 steps at lr 3e-2 (Adam's normalised step magnifies float32 rounding)
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, atol=5e-5, rtol=0, msg=key)


# ---- a bare 4-bit head: dequantized a slice of rows at a time -------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_sliced_forward_computes_what_the_4bit_layer_does(
    monkeypatch: pytest.MonkeyPatch, double_quant: bool, compute: torch.dtype
) -> None:
    monkeypatch.setattr(codec, "SLICE_ELEMENTS", 64 * 100)  # slices of 100 rows: 1000 = 10 slices, the last short
    dense = nn.Linear(64, 1000, bias=True)
    layer = codec.to_4bit(dense, "head", QuantizationConfig(double_quant=double_quant), compute)
    x = torch.randn(3, 5, 64, requires_grad=True)
    expected = layer(x)
    (expected * torch.arange(1000.0)).sum().backward()  # a gradient that differs per output row
    expected_grad, x.grad = x.grad, None
    got = codec.sliced_forward(layer, x)
    (got * torch.arange(1000.0)).sum().backward()
    assert got.dtype == expected.dtype == torch.float32
    tolerance = 1e-6 if compute == torch.float32 else 1e-2  # bfloat16: sums in another order
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    scale = expected_grad.abs().max().item()  # gradients run to 1e4 here: tolerances relative to that
    torch.testing.assert_close(x.grad, expected_grad, atol=tolerance * scale, rtol=tolerance * 10)


def test_a_4bit_head_is_never_dequantized_whole_in_the_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss over a bare 4-bit head holds one slice of its dense weight, where bitsandbytes holds all of it."""
    monkeypatch.setattr(codec, "SLICE_ELEMENTS", 64 * 1024)  # 32 slices of the 32768 x 64 head
    model = four_bit_head()
    peftkit.adapt(model, "lora", target_modules=["q_proj"], r=4)
    hidden = torch.randn(40, 64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (40,))

    def peak(head: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, torch.Tensor]:
        hidden.grad = None
        with LiveBytes() as counter:
            loss = head_cross_entropy(head, hidden, targets, chunk_size=8)
            loss.backward()
        return counter.peak, loss.detach()

    whole, whole_loss = peak(lambda x: model.lm_head(x))  # bitsandbytes' own forward
    whole_grad = hidden.grad
    sliced, sliced_loss = peak(model.lm_head)
    torch.testing.assert_close(sliced_loss, whole_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, whole_grad, atol=1e-5, rtol=1e-5)
    # The dense head is 32768 x 64 float32 = 8.4 MB; a slice 0.26 MB. Chunks' logits (8 x 32768 float32) are
    # 1 MB each. measured: 9.6 MB -> 3.2 MB
    dense_head = VOCAB * 64 * 4
    assert whole > dense_head and sliced < 0.5 * dense_head, (whole, sliced)
