"""Saving a matplotlib figure the way every compare and analyze plot is saved: tight, 110 dpi, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.files import atomic_write

__all__ = ["save_figure"]


def save_figure(figure: Any, path: Path) -> None:
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
