"""Log noise from dependencies that says nothing is wrong, filtered once for every entry point.

Set when `peftkit` is imported, because transformers or accelerate may import
bitsandbytes before peftkit does (e.g. in each process of a distributed launch).
"""

from __future__ import annotations

import logging

__all__: list[str] = []


def _drop_optional_kernel_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes warns on import, on CPUs with AVX512-BF16, that the optional `kernels`
    package is absent; its built-in 4-bit kernels are used instead."""
    return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_optional_kernel_notice)
