"""Gradient (activation) checkpointing for an adapted transformers model, whatever the method and base.

The one switch: `peftkit train`, the estimate and `prepare_for_kbit_training` all turn it on here.

Checkpointing keeps only each block's input in forward and recomputes the block in
backward. Whether the block's input must require grad depends on the flavour:

- non-reentrant (`use_reentrant=False`, the default): autograd records the recomputed
  block as usual, so gradients reach trained weights inside it (adapters over a frozen
  or 4-bit base) whether or not its input requires grad. A grad-requiring input only
  adds work: with a trained head over a frozen body (`head`) it makes backward run
  through every frozen block, which costs more memory than no checkpointing at all.
  So the input embeddings' output is left as autograd makes it.
- reentrant: the block runs under no_grad and is replayed in backward only if one of
  its inputs requires grad; when the input embeddings are frozen nothing does, and
  the adapters inside would get no gradient. Then the embeddings' output is made to
  require grad (`enable_input_require_grads`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.errors import ConfigError

__all__ = ["check_checkpointable", "enable_gradient_checkpointing"]


def check_checkpointable(model: nn.Module) -> None:
    """ConfigError unless `model` is a transformers model whose checkpointing this module can switch."""
    needed = ("gradient_checkpointing_enable", "enable_input_require_grads", "disable_input_require_grads")
    if not all(callable(getattr(model, name, None)) for name in needed):
        raise ConfigError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); gradient checkpointing needs a "
            "transformers model."
        )


def enable_gradient_checkpointing(
    model: nn.Module, checkpointing_kwargs: dict[str, Any] | None = None, inputs_require_grad: bool | None = None
) -> nn.Module:
    """Switch on checkpointing (non-reentrant unless `checkpointing_kwargs` says otherwise); returns `model`.

    Call it after the adapters are attached: whether the embeddings are frozen decides
    what reentrant checkpointing needs. Before they are (`prepare_for_kbit_training`, as
    in PEFT), pass `inputs_require_grad=True`: the embeddings' output then requires grad
    whatever is frozen later.
    """
    check_checkpointable(model)
    kwargs = {"use_reentrant": False, **(checkpointing_kwargs or {})}
    enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5.x
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    embeddings = model.get_input_embeddings()
    frozen = not any(param.requires_grad for param in embeddings.parameters())
    if inputs_require_grad if inputs_require_grad is not None else kwargs["use_reentrant"] and frozen:
        model.enable_input_require_grads()
    else:
        try:  # transformers >= 5 makes every input_ids model's embeddings output require grad
            model.disable_input_require_grads()
        except AttributeError:  # older versions register no hook, and have none to remove
            pass
    return model
