"""compressed-tensors' ``pack-quantized`` layout, as int8 writes it and as its loaders read it.

Each quantized linear ``M`` is stored as three tensors: ``M.weight_packed`` (int32, four int8 codes
+ 128 per little-endian word), ``M.weight_scale`` (one scale per group of input values) and
``M.weight_shape`` (int64 ``[out, in]``). ``config.json`` carries a ``quantization_config``: built
here with compressed-tensors' own pydantic models, and validated here (one set of rules, used by
`int8 verify` to list every problem and by `int8.load` to refuse a checkpoint it cannot run).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
PACKED, SCALE, SHAPE = "weight_packed", "weight_scale", "weight_shape"
"""The tensor names of a quantized layer ``M``: ``M.weight_packed``, ``M.weight_scale``, ``M.weight_shape``."""
WHERE = "config.json: quantization_config"


PACK_FACTOR = 4
"""int8 codes per int32 word in the packed layout."""


def packed_columns(in_features: int) -> int:
    return math.ceil(in_features / PACK_FACTOR)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes ``(out, in)`` -> compressed-tensors ``weight_packed`` int32 ``(out, ceil(in/4))``."""
    rows, cols = codes.shape
    padded = torch.zeros(rows, packed_columns(cols) * PACK_FACTOR, dtype=torch.uint8, device=codes.device)
    torch.bitwise_xor(codes.view(torch.uint8), 0x80, out=padded[:, :cols])
    return padded.view(torch.int32)


def unpack_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """compressed-tensors ``weight_packed`` int32 ``(out, ceil(in/4))`` -> int8 codes ``(out, in)``.

    A packed byte of 0 (the padding value) unpacks to -128, which no valid
    checkpoint holds inside the first ``in_features`` columns.
    """
    if packed.dtype != torch.int32:
        raise ValueError(f"weight_packed must be int32, got {packed.dtype}")
    rows = packed.shape[0]
    raw = packed.contiguous().view(torch.uint8).view(rows, -1)[:, :in_features]
    return (raw ^ 0x80).view(torch.int8)


def build_config(group_size: int, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` for 8-bit symmetric int weights in groups of ``group_size`` input values,
    every ``Linear`` but ``ignore`` quantized: built and serialized by compressed-tensors itself."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="group", group_size=group_size,
                                 dynamic=False),
        format=FORMAT,
    )
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=FORMAT, quantization_status="compressed",
                            ignore=ignore)
    return {
        "version": compressed_tensors.__version__,
        "quant_method": QUANT_METHOD,
        "sparsity_config": {},
        "transform_config": {},
        **qc.model_dump(exclude={"quant_method"}, mode="json"),
    }


@dataclass(frozen=True)
class ConfigCheck:
    """What a ``quantization_config`` says, and what is wrong with it (nothing for a sound one)."""

    problems: tuple[str, ...]
    group_size: int | None  # the one group size of every group; None when absent or inconsistent
    ignore: tuple[str, ...]  # the well-formed entries of ``ignore``


def check_config(qc: object) -> ConfigCheck:
    """Every problem of a compressed-tensors ``quantization_config`` for int8's layout: 8-bit symmetric int
    weights, group strategy, weight-only, pack-quantized, compressed; a valid ``ignore`` list."""
    problems: list[str] = []
    if not isinstance(qc, dict):
        return ConfigCheck((f"{WHERE} is not an object",), None, ())
    want = {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed"}
    for key, value in want.items():
        if qc.get(key) != value:
            problems.append(f"{WHERE}.{key} is {_short(qc.get(key))}, not {value!r}")
    sizes = set()
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        problems.append(f"{WHERE}.config_groups is missing or empty")
        groups = {}
    for gname, group in groups.items():
        at = f"{WHERE}.config_groups.{_short(gname)}"
        if not isinstance(group, dict):
            problems.append(f"{at} is not an object")
            continue
        w = group.get("weights")
        if not isinstance(w, dict):
            problems.append(f"{at}.weights is missing")
            continue
        expect = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "dynamic": False}
        for key, value in expect.items():
            if w.get(key) != value:
                problems.append(f"{at}.weights.{key} is {_short(w.get(key))}, not {value!r}")
        gs = w.get("group_size")
        if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1:
            problems.append(f"{at}.weights.group_size is {_short(gs)}, not a positive integer")
        else:
            sizes.add(gs)
        if group.get("input_activations") or group.get("output_activations"):
            problems.append(f"{at} quantizes activations; an int8 checkpoint is weight-only")
        fmt = group.get("format")
        if fmt is not None and fmt != FORMAT:
            problems.append(f"{at}.format is {_short(fmt)}, not {FORMAT!r}")
        targets = group.get("targets")
        if not isinstance(targets, list) or "Linear" not in targets:
            problems.append(f"{at}.targets is {_short(targets)}; it must include 'Linear'")
    if len(sizes) > 1:
        problems.append(f"{WHERE} has different group sizes in different groups: {sorted(sizes)}")
    ignore: list[str] = []
    raw = qc.get("ignore", [])
    if not isinstance(raw, list):
        problems.append(f"{WHERE}.ignore is not a list")
        raw = []
    for i, pat in enumerate(raw):
        if not isinstance(pat, str):
            problems.append(f"{WHERE}.ignore[{i}] is {_short(pat)}, not a module name or pattern")
        elif pat.startswith("re:") and (why := bad_regex(pat[3:])):
            problems.append(f"{WHERE}.ignore[{i}] {_short(pat)} is not a valid regular expression ({why})")
        else:
            ignore.append(pat)
    return ConfigCheck(tuple(problems), next(iter(sizes)) if len(sizes) == 1 else None, tuple(ignore))


def is_ignored(module: str, class_name: str, ignore: tuple[str, ...] | list[str]) -> bool:
    """compressed-tensors' matching of ``ignore``: a module name, ``re:`` + a regular expression matched at
    the start of the name, or a class name."""
    for pat in ignore:
        if pat.startswith("re:"):
            if not bad_regex(pat[3:]) and re.match(pat[3:], module):
                return True
        elif pat in (module, class_name):
            return True
    return False


def bad_regex(pattern: str) -> str:
    """Why ``pattern`` does not compile ('' when it does)."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return str(e) or type(e).__name__
    return ""


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
