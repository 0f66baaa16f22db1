"""The method author's kit: what a method (built-in or a third-party plugin) may build on.

`variants/` imports only from here, from `peftkit` and from `peftkit.quant`, exactly as
an outside package must (a test keeps it so); these names are a promise, the modules
behind them are not. See the README's "Writing a method".

- the contract: `AdapterMethod`, `MethodConfig`, `peft_option`, the adapter and host
  classes of `peftkit.layer` (their capability table is in its docstring);
- targets: `candidate_modules`, `matches_pattern`, `find_targets`, `ALL_LINEAR`;
- injection: `hosts`, `add_adapter`, `DEFAULT_ADAPTER`, and the record of methods on a
  model (`adapter_methods`, `record_for_update` for a method that rebuilds its entry);
- weights, whatever their storage (4-bit included): `read_weight`, `write_weight`,
  `layer_features`, `is_linear`, `weight_source`, `using_weight_source`, and
  `rebuild_on_failure` for a weight that a failed adapt re-reads rather than holds;
- a model's anatomy: `output_head_path`, `task_heads`, `tied_parameters`;
- option checks: `from_options`, `check_pattern`.
"""

from peftkit.adapters import disable_adapters, mark_trainable
from peftkit.anatomy import output_head_path, task_heads, tied_parameters
from peftkit.errors import (
    AdapterStateError,
    ConfigError,
    MergeError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from peftkit.injection import add_adapter, hosts
from peftkit.layer import Adapter, AdapterHost, AdapterLayer, LowRankAdapter, ParameterAdapter, TrainableCopy
from peftkit.method import AdapterMethod
from peftkit.options import MethodConfig, peft_option
from peftkit.record import DEFAULT_ADAPTER, adapter_methods, record_for_update
from peftkit.targets import ALL_LINEAR, candidate_modules, find_targets, matches_pattern
from peftkit.undo import rebuild_on_failure
from peftkit.validation import check_pattern, from_options
from peftkit.weights import is_linear, layer_features, read_weight, using_weight_source, weight_source, write_weight

__all__ = [
    "ALL_LINEAR",
    "Adapter",
    "AdapterHost",
    "AdapterLayer",
    "AdapterMethod",
    "AdapterStateError",
    "ConfigError",
    "DEFAULT_ADAPTER",
    "LowRankAdapter",
    "MergeError",
    "MethodConfig",
    "ParameterAdapter",
    "TargetNotFoundError",
    "TrainableCopy",
    "UnsupportedModuleError",
    "adapter_methods",
    "add_adapter",
    "candidate_modules",
    "check_pattern",
    "disable_adapters",
    "find_targets",
    "from_options",
    "hosts",
    "is_linear",
    "layer_features",
    "mark_trainable",
    "matches_pattern",
    "output_head_path",
    "peft_option",
    "read_weight",
    "rebuild_on_failure",
    "record_for_update",
    "task_heads",
    "tied_parameters",
    "using_weight_source",
    "weight_source",
    "write_weight",
]
