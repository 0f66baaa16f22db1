"""The injection engine: put adapters into a model's target layers, and find what they train.

It knows layers and targets only, never a method: a method hands it its config, the
layer types it adapts and a factory for one adapter (`AdapterMethod.attach` does).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from peftkit.anatomy import task_heads
from peftkit.errors import TargetNotFoundError
from peftkit.layer import Adapter, AdapterHost, AdapterLayer, TrainableCopy
from peftkit.options import MethodConfig
from peftkit.targets import candidate_modules, matches_pattern

__all__ = ["hosts", "inject_adapters", "add_adapter", "adapter_tensors"]

AdapterFactory = Callable[[nn.Module, str], Adapter]


def hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    """Every peftkit host module in `model`, with its path."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterHost):
            yield name, module


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def inject_adapters(
    model: nn.Module, adapter_name: str, config: MethodConfig, targets: list[str], create: AdapterFactory
) -> list[str]:
    """Wrap each module of `targets` in an `AdapterLayer` (once) and add `create(layer, path)` to it; the
    modules of `config.modules_to_save` (and a random task head) train as copies.

    Every adapter and every `modules_to_save` pattern is resolved before the model is
    touched, so a config that matches nothing leaves the model as it was.
    """
    # A random task head trains in full, unless the user chose to adapt it instead.
    to_save = _modules_to_save(
        model, (config.modules_to_save or []) + [h for h in task_heads(model) if h not in targets]
    )
    adapters = {}
    for name in targets:
        module = model.get_submodule(name)
        adapters[name] = create(module.base_layer if isinstance(module, AdapterLayer) else module, name)
    for name, adapter in adapters.items():
        add_adapter(model, name, adapter_name, adapter)
    for name in to_save:
        module = model.get_submodule(name)
        host = module if isinstance(module, TrainableCopy) else TrainableCopy(module)
        host.adapters[adapter_name] = copy.deepcopy(host.original_module)
        if host is not module:
            model.set_submodule(name, host)
    return targets


def add_adapter(model: nn.Module, path: str, adapter_name: str, adapter: Adapter) -> AdapterLayer:
    """Wrap the module at `path` in an `AdapterLayer` (once) and add `adapter` to it, on its base's device.

    For methods that place adapters by options of their own (LoRA's `target_parameters`).
    """
    module = model.get_submodule(path)
    host = module if isinstance(module, AdapterLayer) else AdapterLayer(module)
    host.adapters[adapter_name] = adapter.to(_device_of(host.base_layer))
    if host is not module:
        model.set_submodule(path, host)
    return host


def _modules_to_save(model: nn.Module, patterns: list[str]) -> list[str]:
    if not patterns:
        return []
    chosen = [name for name, _ in candidate_modules(model) if matches_pattern(name, patterns)]
    if not chosen:
        raise TargetNotFoundError(f"modules_to_save={patterns!r} matched no module of {type(model).__name__}.")
    return chosen


def adapter_tensors(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """Model path -> live tensor for everything one adapter trains and saves, found by structure.

    That is the adapter modules under every host, plus the biases the `bias` policy
    (`none`, `lora_only`, `all`) adds.
    """
    state: dict[str, torch.Tensor] = {}
    for path, host in hosts(model):
        if adapter_name not in host.adapters:
            continue
        state.update(host.adapters[adapter_name].state_dict(prefix=f"{path}.adapters.{adapter_name}.", keep_vars=True))
        layer_bias = getattr(host.wrapped, "bias", None)
        if bias == "lora_only" and isinstance(host, AdapterLayer) and isinstance(layer_bias, nn.Parameter):
            state[f"{path}.base_layer.bias"] = layer_bias
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias") and ".adapters." not in name:
                state.setdefault(name, param)
    return state
