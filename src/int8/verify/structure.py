"""The structure and integrity checks: everything `int8 verify --quick` does. No model is built.

The small files are read once into a `Layout` (`int8.verify.layout`); the data
of the shards is read once (`int8.verify.scan`: hashing and value checks
together), so the time scales with the bytes on disk. The checks themselves
(`int8.verify.checks`) are functions of those two readings, applied as they
suit who wrote the folder (`int8.verify.provenance`, `int8.verify.checks.provenance`):
another tool's checkpoint in a scheme verify does not check (`int8.verify.scheme`)
is reported as such and not read further.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .checks.card import check_card
from .checks.config import check_config, check_index, check_tensors
from .checks.data import check_data
from .checks.files import check_contained, check_files, check_manifest, check_report
from .checks.provenance import for_origin, unsupported
from .checks.tokenizer import check_tokenizer
from .layout import Layout, QuantLayer, StoredTensor, read_layout
from .provenance import Origin, read_origin
from .result import Check, Group, skipped
from .scan import scan_all

__all__ = ["BLOCKING", "STRUCTURE_CHECKS", "Layout", "QuantLayer", "StoredTensor", "Structure", "check_structure"]

STRUCTURE_CHECKS = ("report", "config", "index", "tensors", "codes", "scales", "finite", "sha256", "files", "tokenizer",
                    "card")
"""The checks after ``contained``, in the order they run."""

BLOCKING = ("config", "index", "tensors", "contained")
"""Checks that, when they fail, make the model-level checks meaningless (the tensors cannot be trusted to load)."""


@dataclass(frozen=True)
class Structure:
    """The structure checks in order, the layout they read, and the figures of the data pass."""

    checks: tuple[Check, ...]
    layout: Layout
    metrics: Mapping[str, float] = field(default_factory=dict)
    origin: Origin | None = None  # who wrote it (None: nothing was read)
    unsupported: str = ""  # another tool's checkpoint in a scheme verify does not check: the scheme, in words

    @property
    def blocked(self) -> list[str]:
        """The `BLOCKING` checks that failed."""
        return [c.name for c in self.checks if c.failed and c.name in BLOCKING]


def _metrics(bytes_checked: int, scan_seconds: float, seconds: float) -> dict[str, float]:
    return {
        "bytes_checked": bytes_checked,
        "scan_seconds": round(scan_seconds, 4),
        "structure_seconds": round(seconds, 3),
        "throughput_gb_s": round(bytes_checked / scan_seconds / 1e9, 3) if scan_seconds else 0.0,
    }


def check_structure(folder: Path, *, workers: int | None = None) -> Structure:
    """Run every structure and integrity check on a converted folder."""
    started = time.perf_counter()
    folder = Path(folder)
    contained = check_contained(folder)
    if contained.failed:  # a link out of the folder: nothing in it is read, so nothing outside can be
        why = "a file of the folder links outside it, so nothing was read"
        checks = (contained, *(skipped(n, why, group=Group.STRUCTURE) for n in STRUCTURE_CHECKS))
        return Structure(checks, Layout(folder), _metrics(0, 0.0, time.perf_counter() - started))
    origin = read_origin(folder)
    if not origin.own and (scheme := _foreign_scheme(folder)):
        checks = unsupported(origin, scheme, contained, STRUCTURE_CHECKS)
        return Structure(checks, Layout(folder, origin=origin), _metrics(0, 0.0, time.perf_counter() - started), origin,
                         scheme)
    layout, readings = read_layout(folder, origin)
    scan_started = time.perf_counter()
    scans = scan_all(list(layout.shards), layout, workers)
    scan_seconds = time.perf_counter() - scan_started
    checks = (
        contained,
        check_report(layout, readings.report),
        check_config(layout, readings.config),
        check_index(layout, readings.index),
        check_tensors(layout, readings.tensors, readings.index, scans),
        *check_data(layout, scans),
    )
    return finish(checks, layout, scans, origin, started, scan_seconds)


def finish(head: tuple, layout: Layout, scans, origin, started: float, scan_seconds: float) -> Structure:
    """The structure result of a layout: the layout's own checks (``head``), then those every layout shares
    (manifest, files, tokenizer, card), kept as they apply to the checkpoint's origin."""
    checks = for_origin((*head, check_manifest(layout, scans), check_files(layout), check_tokenizer(layout),
                         check_card(layout)), origin)
    bytes_checked = sum(s.bytes for s in scans.values())
    return Structure(checks, layout, _metrics(bytes_checked, scan_seconds, time.perf_counter() - started), origin)


def _foreign_scheme(folder: Path) -> str:
    """Why another tool's checkpoint is in a scheme verify does not check ("": it is in int8's, or its
    config.json cannot be read, which the config check reports)."""
    import json

    from .scheme import unsupported_scheme

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    return unsupported_scheme(config)
