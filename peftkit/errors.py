"""The exceptions peftkit raises: one small hierarchy so callers can catch by kind."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

__all__ = [
    "PeftkitError",
    "ConfigError",
    "UnknownMethodError",
    "TargetNotFoundError",
    "UnsupportedModuleError",
    "AdapterExistsError",
    "AdapterNotFoundError",
    "AdapterStateError",
    "ShapeMismatchError",
    "AdapterFileError",
    "MergeError",
    "DestinationError",
    "OutputDirError",
    "CheckpointError",
    "UntrustedCheckpointError",
    "closest_match",
    "did_you_mean",
]


def closest_match(name: str, options: Iterable[str], aliases: Mapping[str, str] | None = None) -> str | None:
    """The option most similar to `name`, for "did you mean" hints.

    `aliases` maps other names of an option (PEFT's key, a synonym such as `rank` for
    `r`) to the option: they count as the option itself, so the closest match is by
    meaning as well as by spelling.
    """
    options = list(options)
    aliases = dict(aliases or {})
    if name in aliases:
        return aliases[name]
    spellings = {option: option for option in options} | aliases
    matches = difflib.get_close_matches(name, list(spellings), n=1, cutoff=0.5)
    return spellings[matches[0]] if matches else None


def did_you_mean(name: str, options: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    match = closest_match(name, options, aliases)
    return f" Did you mean {match!r}?" if match else ""


class PeftkitError(Exception):
    """Base class of every error peftkit raises on purpose."""


class ConfigError(PeftkitError, ValueError):
    """An option is unknown, of the wrong type, or out of range."""


class UnknownMethodError(ConfigError, KeyError):
    """No adapter method is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TargetNotFoundError(ConfigError):
    """A target pattern matched no module of the model."""


class UnsupportedModuleError(ConfigError, TypeError):
    """A targeted module is of a type the method cannot adapt."""


class AdapterExistsError(PeftkitError):
    """An adapter name is already in use on the model."""


class AdapterNotFoundError(PeftkitError, KeyError):
    """The model has no adapter under the requested name."""

    def __str__(self) -> str:
        return str(self.args[0])


class AdapterStateError(PeftkitError):
    """The operation does not fit the adapter's current state (merged, disabled...)."""


class ShapeMismatchError(PeftkitError, ValueError):
    """Adapter tensors do not fit the modules of the base model."""


class AdapterFileError(PeftkitError, OSError):
    """An adapter directory is missing files, or they are corrupt or of another method."""


class MergeError(PeftkitError, ArithmeticError):
    """A merge would write NaN/Inf, or the method has no weight delta."""


class DestinationError(PeftkitError, OSError):
    """An output cannot be written there: it is a file, an input, read-only, the disk is full..."""


class OutputDirError(DestinationError):
    """A run's output directory holds another run's state, or cannot be written."""


class CheckpointError(AdapterFileError):
    """A checkpoint is unreadable: a file is missing, truncated or corrupt."""


class UntrustedCheckpointError(CheckpointError):
    """trainer_state.pt holds more than tensors and plain containers, so it is never unpickled."""


class LossyMergeWarning(UserWarning):
    """A merge into a lossy base (4-bit) changed the weights by more than the adapters' deltas."""
