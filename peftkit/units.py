"""Byte sizes as people read them: one unit system (binary, GiB and MiB) for every message and report."""

from __future__ import annotations

__all__ = ["GIB", "MIB", "format_bytes"]

GIB = 2**30
MIB = 2**20


def format_bytes(nbytes: float) -> str:
    """`nbytes` in GiB, or MiB below one GiB."""
    return f"{nbytes / GIB:.2f} GiB" if abs(nbytes) >= GIB else f"{nbytes / MIB:.1f} MiB"
