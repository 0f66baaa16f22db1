"""peftkit: parameter-efficient fine-tuning behind one interface.

import peftkit
model = peftkit.adapt(model, "lora", r=8, alpha=16, target_modules="all-linear")
...train...
peftkit.save_adapter(model, "out/adapter")   # HF PEFT's format
"""

from peftkit import logs  # noqa: F401  (quiets third-party log noise; see there)
from peftkit.adapters import (
    adapt,
    delete_adapter,
    disable_adapters,
    list_adapters,
    mark_trainable,
    rename_adapter,
    set_active_adapters,
    set_adapters_enabled,
    trainable_parameters,
)
from peftkit.analysis import analyze
from peftkit.combine import combine_adapters
from peftkit.errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    AdapterStateError,
    CheckpointError,
    ConfigError,
    DestinationError,
    MergeError,
    OutputDirError,
    PeftkitError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnknownMethodError,
    UnsupportedModuleError,
    UntrustedCheckpointError,
)
from peftkit.layer import Adapter, AdapterHost, AdapterLayer, LowRankAdapter, ParameterAdapter, TrainableCopy
from peftkit.loading import hot_swap_adapter, load_adapter
from peftkit.merge import merge, merge_and_unload, switch_merged_adapter, unload, unmerge
from peftkit.method import AdapterMethod
from peftkit.options import MethodConfig, peft_option
from peftkit.peft_format import adapter_state_dict
from peftkit.record import adapter_methods
from peftkit.registry import available_methods, get_method, register_method
from peftkit.routing import RowRouting, mixed_batch
from peftkit.saving import save_adapter

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterExistsError",
    "AdapterFileError",
    "AdapterHost",
    "AdapterLayer",
    "AdapterMethod",
    "AdapterNotFoundError",
    "AdapterStateError",
    "CheckpointError",
    "ConfigError",
    "DestinationError",
    "LowRankAdapter",
    "MergeError",
    "MethodConfig",
    "OutputDirError",
    "ParameterAdapter",
    "PeftkitError",
    "RowRouting",
    "ShapeMismatchError",
    "TargetNotFoundError",
    "TrainableCopy",
    "UnknownMethodError",
    "UnsupportedModuleError",
    "UntrustedCheckpointError",
    "adapt",
    "adapter_methods",
    "adapter_state_dict",
    "analyze",
    "available_methods",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "get_method",
    "hot_swap_adapter",
    "list_adapters",
    "load_adapter",
    "mark_trainable",
    "merge",
    "merge_and_unload",
    "mixed_batch",
    "peft_option",
    "register_method",
    "rename_adapter",
    "save_adapter",
    "set_active_adapters",
    "set_adapters_enabled",
    "switch_merged_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
