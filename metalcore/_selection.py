"""Automatic selection from measurements: the per-device table written by
``python -m metalcore.bench --selection``.

:func:`measured_choice` answers, for one call's metadata, whether the measured table prefers the
backend's kernel (True), the torch path (False), or has no measurement for it (None, and the
kernel's own ``automatic`` rule decides). It depends on shapes and dtypes only, never on data, so
the dispatcher may cache its answer per call signature.
"""

from __future__ import annotations

from typing import Any

import torch


def measured_choice(op: str, backend: str, device: torch.device, args: tuple[Any, ...]) -> bool | None:
    """Whether the measured table for ``device`` prefers ``backend``'s kernel for ``op`` on these
    arguments; None where no table or no grid point covers the call."""
    return None
