"""Baselines an adapter is measured against: full fine-tuning and linear probing.

```
 full:   x ──► [ embeddings ─► blocks ─► head ]   every weight trained, in place ──► y
 head:   x ──► [ embeddings ─► blocks ] (frozen) ──► h ──► head (trained, in place) ──► y = W h (+ b)
```

Full fine-tuning updates every parameter, `theta <- theta - lr * grad_theta L` for all
of theta (the reference every PEFT paper reports, e.g. BERT, Devlin et al., 2018,
https://arxiv.org/abs/1810.04805). Linear probing trains only the output head
`y = W h + b` on the frozen features `h` (Kumar et al., 2022,
https://arxiv.org/abs/2202.10054, compare it with full fine-tuning).

Both train the model's own tensors in place: nothing is injected, and the "adapter"
is the trained tensors themselves (saved under their model paths, `peft_type` None).
That has consequences the class docstrings spell out: with no frozen copy of the
base, `disable_adapters` cannot bring the base back, and merging has nothing to do.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod

import torch
from torch import nn
from transformers import PretrainedConfig

from peftkit.authoring import (
    Adapter,
    AdapterMethod,
    AdapterStateError,
    ConfigError,
    MethodConfig,
    TargetNotFoundError,
    UnsupportedModuleError,
    adapter_methods,
    output_head_path,
    task_heads,
    tied_parameters,
)

__all__ = ["BaselineConfig", "InPlaceMethod", "FullFineTuning", "HeadOnly", "head_paths"]


@dataclasses.dataclass
class BaselineConfig(MethodConfig):
    """Options of a baseline: it picks its own tensors, so the targeting options have no role.

    `target_modules` (and `bias`) are accepted and ignored, so that a comparison can pass
    the same options to every method. `exclude_modules`, `layers_to_transform` and
    `modules_to_save` would promise a narrower or wider training set than the method
    trains, so they are refused.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        where = type(self).__name__
        for option in ("exclude_modules", "layers_to_transform", "modules_to_save"):
            if getattr(self, option) is not None:
                raise ConfigError(
                    f"{where}.{option} must be None: a baseline trains a fixed set of tensors, "
                    f"got {getattr(self, option)!r}. Use lora (or another adapter method) to choose modules."
                )


def _module_tensors(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """Model path -> live tensor for the parameters and persistent buffers under `path`.

    Shared (tied) tensors appear once, under their first path. Persistent buffers
    (BatchNorm's running statistics) change in training too, so they are saved.
    """
    module = model.get_submodule(path)
    prefix = f"{path}." if path else ""
    persistent = {prefix + key for key in module.state_dict(keep_vars=True)}
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(prefix=path))
    tensors.update((name, b) for name, b in module.named_buffers(prefix=path) if name in persistent)
    return tensors


class InPlaceMethod(AdapterMethod):
    """A method that trains tensors of the model itself rather than adapters beside them.

    `attach` injects nothing; `trainable_state` names the trained tensors by their
    model paths, and saving writes them as they are. Since the trained tensors are the
    model's own:

    - `disable_adapters` raises: there is no frozen base copy to fall back to
      (keep one, or reload the base model, to compare against it);
    - `merge`/`unmerge` are no-ops and `merge_and_unload` just forgets the adapter: the
      weights already are the model's;
    - `delete_adapter` forgets the adapter but keeps the trained weights;
    - it must be the only adapter on the model (others' tensors would be trained with it;
      the core refuses to add one after it, `attach` refuses to come after one).
    """

    config_class = BaselineConfig
    peft_type = None
    trains_in_place = True

    @abstractmethod
    def trained_modules(self, model: nn.Module) -> list[str]:
        """Paths of the modules whose tensors this method trains (`""` is the whole model)."""

    def prepare(self, model: nn.Module) -> None:
        """Get `model` ready before its tensors are collected (e.g. untie a head)."""

    def adaptable_types(self) -> tuple[type[nn.Module], ...]:
        return ()

    def create_adapter(self, base_layer: nn.Module, module_name: str) -> Adapter:
        raise AdapterStateError(f"{self.name} trains the model's own tensors and puts no adapter on {module_name!r}.")

    def attach(self, model: nn.Module, adapter_name: str) -> list[str]:
        existing = adapter_methods(model)
        if existing:
            raise AdapterStateError(
                f"{self.name} trains the model's own tensors, so it must be the only adapter on the model; "
                f"this one already has {', '.join(f'{n!r} ({m.name})' for n, m in existing.items())}. "
                "Start from a fresh model, or merge_and_unload the others first."
            )
        quantized = [
            name
            for path in self.trained_modules(model)
            for name, t in _module_tensors(model, path).items()
            if isinstance(t, nn.Parameter) and not t.is_floating_point()
        ]
        if quantized:
            raise UnsupportedModuleError(
                f"{self.name} cannot train non-floating-point (quantized) parameters, e.g. {quantized[:3]}; "
                "load the model in a floating-point dtype, or use qlora."
            )
        self.prepare(model)  # after the checks: it changes the model (unties a head)
        return []

    def trainable_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        return {
            name: t
            for path in self.trained_modules(model)
            for name, t in _module_tensors(model, path).items()
            if t.is_floating_point()
        }


class FullFineTuning(InPlaceMethod):
    """Full fine-tuning: every floating-point parameter of the model trains, in place.

    The saved "adapter" is the whole set of trained weights (plus persistent float
    buffers such as BatchNorm statistics), tied weights once; loading it onto a fresh
    base model gives the trained model back. `target_modules` is ignored: the whole
    model is the target. See `InPlaceMethod` for what disable and merge mean here.
    """

    name = "full"
    description = "Full fine-tuning: every weight trains in place (the reference a comparison needs)."
    trains_base_weights = True

    def trained_modules(self, model: nn.Module) -> list[str]:
        return [""]


def head_paths(model: nn.Module) -> list[str]:
    """Paths of the model's output head: a task model's classifier/score head, else the LM head."""
    heads = task_heads(model)
    if heads:
        return heads
    path = output_head_path(model)
    if path is None:
        raise TargetNotFoundError(
            f"{type(model).__name__} has no output head to probe: get_output_embeddings() gives none and it has "
            "no task head (classifier, score, qa_outputs). Use a *ForCausalLM or *For<Task> model."
        )
    return [path]


class HeadOnly(InPlaceMethod):
    """Linear probing: only the output head trains, in place (not as a trainable copy beside it).

    The head is a task model's classifier/score/qa_outputs head, else the language-model
    head (`get_output_embeddings()`). `target_modules` is ignored.

    Tied embeddings: when the head's weight is shared with the input embedding (Gemma,
    `tie_word_embeddings=True`), training it would change the input embedding too, which
    is not linear probing. So `attach` unties it: the head gets its own copy of the
    weight (one more vocab x hidden matrix in memory) and every `tie_word_embeddings`
    in the model's configs is set to False, so transformers does not tie it again (and
    `save_pretrained` writes both). The input embedding stays frozen and unchanged.
    See `InPlaceMethod` for what disable and merge mean here.
    """

    name = "head"
    description = "Linear probing: only the output head trains, in place (a tied head is untied first)."

    def trained_modules(self, model: nn.Module) -> list[str]:
        return head_paths(model)

    def prepare(self, model: nn.Module) -> None:
        """Give each head parameter shared with another module its own copy (see the class docstring)."""
        tied = tied_parameters(model)
        untied = False
        for path in self.trained_modules(model):
            head = model.get_submodule(path)
            for name, param in list(head.named_parameters()):
                if id(param) in tied:
                    owner, _, leaf = name.rpartition(".")
                    setattr(head.get_submodule(owner), leaf, nn.Parameter(param.detach().clone(), param.requires_grad))
                    untied = True
        if untied:
            for module in model.modules():
                config = getattr(module, "config", None)
                if isinstance(config, PretrainedConfig) and getattr(config, "tie_word_embeddings", False):
                    config.tie_word_embeddings = False
