"""One run of a comparison in its own process: `python -m peftkit.compare.child RUN.yaml RESULT.json`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from peftkit.errors import PeftkitError
from peftkit.files import atomic_write_json
from peftkit.inject import trainable_parameters
from peftkit.training.config import load_config
from peftkit.training.loop import train

__all__ = ["RESULT_NAME"]

RESULT_NAME = "run.json"  # what the child adds to the run directory: parameter counts


def _child_main(argv: Sequence[str]) -> int:
    """A run in its own process: train as the YAML says, then write the parameter counts."""
    config_path, result_path = argv
    try:
        result = train(load_config(config_path))
    except PeftkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    trainable, total = trainable_parameters(result.model)
    atomic_write_json(result_path, {"trainable_params": trainable, "total_params": total})
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
