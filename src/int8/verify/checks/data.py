"""The checks of the stored values, from the one data pass over the shards: ``codes``, ``scales``, ``finite``."""

from __future__ import annotations

import math
from pathlib import Path

from ...scheme import QMAX
from ..layout import Layout
from ..result import Check, outcome
from ..scan import ShardScan


def check_data(layout: Layout, scans: dict[Path, ShardScan]) -> list[Check]:
    """codes in [-127, 127]; scales finite and >= 0; other floating tensors without NaN or Inf."""
    found = [scans[p] for p in layout.shards]
    codes = [p for s in found for p in s.codes]
    scales = [p for s in found for p in s.scales]
    finite = [p for s in found for p in s.finite]
    n_codes = sum(s.n_codes for s in scans.values())
    n_scales = sum(s.n_scales for s in scans.values())
    n_float = sum(s.n_float for s in scans.values())
    lo = min((s.scale_min for s in scans.values()), default=math.inf)
    hi = max((s.scale_max for s in scans.values()), default=-math.inf)
    scale_range = f" in [{lo:.3g}, {hi:.3g}]" if n_scales and lo <= hi else ""
    return [
        outcome("codes", codes, figure=f"{n_codes:,} codes in {len(layout.quantized)} layers",
                threshold=f"every code in [-{QMAX}, {QMAX}]"),
        outcome("scales", scales, figure=f"{n_scales:,} scales{scale_range}", threshold="finite and >= 0"),
        outcome("finite", finite, figure=f"{n_float:,} floating values", threshold="no NaN or Inf"),
    ]
