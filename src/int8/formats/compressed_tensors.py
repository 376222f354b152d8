"""compressed-tensors' ``pack-quantized`` layout, as int8 writes it and as its loaders read it.

Each quantized linear ``M`` is stored as three tensors: ``M.weight_packed`` (int32, four int8 codes
+ 128 per little-endian word), ``M.weight_scale`` (one scale per group of input values) and
``M.weight_shape`` (int64 ``[out, in]``). ``config.json`` carries a ``quantization_config``: built
here with compressed-tensors' own pydantic models, and validated here (one set of rules, used by
`int8 verify` to list every problem and by `int8.load` to refuse a checkpoint it cannot run). Its
config groups each have one group size; which group a layer is in is decided here too
(`matching_groups`), the way compressed-tensors matches ``targets``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    import torch

    rows, cols = codes.shape
    padded = torch.zeros(rows, packed_columns(cols) * PACK_FACTOR, dtype=torch.uint8, device=codes.device)
    torch.bitwise_xor(codes.view(torch.uint8), 0x80, out=padded[:, :cols])
    return padded.view(torch.int32)


def unpack_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """compressed-tensors ``weight_packed`` int32 ``(out, ceil(in/4))`` -> int8 codes ``(out, in)``.

    A packed byte of 0 (the padding value) unpacks to -128, which no valid
    checkpoint holds inside the first ``in_features`` columns.
    """
    import torch

    if packed.dtype != torch.int32:
        raise ValueError(f"weight_packed must be int32, got {packed.dtype}")
    rows = packed.shape[0]
    raw = packed.contiguous().view(torch.uint8).view(rows, -1)[:, :in_features]
    return (raw ^ 0x80).view(torch.int8)


LINEAR = "Linear"
"""The class-name target of every linear layer (compressed-tensors matches it against the module's classes)."""


EMBEDDING_LOADERS = {
    "int8.load": "yes (int8's Int8Embedding; a tied head shares the embedding's codes)",
    "transformers": "only de-quantized at load, CompressedTensorsConfig(dequantize=True), and only when every layer "
                    "has one block size (run-compressed, compressed-tensors 0.20 fails on an nn.Embedding)",
    "vLLM": "no (its compressed-tensors integration has no quantization method for embeddings)",
}
"""Which loaders read a checkpoint whose token embeddings are quantized (``int8 convert --embeddings int8``),
as found with transformers 5.24 and compressed-tensors 0.20.1 (vLLM: from its source)."""


def build_config(groups: Mapping[int, Sequence[str]], ignore: list[str], named: Sequence[str] = ()) -> dict[str, Any]:
    """The ``quantization_config`` for 8-bit symmetric int weights: one config group per group size,
    ``groups`` mapping each size to the modules quantized with it.

    ``named``: the quantized modules that are not linears (embeddings, ``--embeddings int8``), which a group
    always targets by exact name.

    One size: its group targets every ``Linear`` (the unquantized ones are in ``ignore``). Several: each
    group lists its modules by exact name, and no group targets a class. A class target would put a
    module in a group other than its own wherever a loader matches class names before module names:
    vLLM matches a fused ``qkv_proj`` by its class (``QKVParallelLinear`` contains "Linear") before
    it looks at the names of ``q_proj``, ``k_proj`` and ``v_proj``.

    Written as compressed-tensors serializes its ``QuantizationConfig`` (``model_dump(mode="json")``; the
    test suite checks that the two are equal, key order included) without importing it: importing
    ``compressed_tensors.quantization`` imports transformers' modeling code, seconds of a conversion's
    fixed cost.
    """
    if not groups:
        raise ValueError("no config group: nothing is quantized")
    sizes = sorted(groups, reverse=True)
    schemes = {
        f"group_{i}": {
            "targets": [LINEAR, *sorted(set(named) & set(groups[size]))] if len(sizes) == 1 else sorted(groups[size]),
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "group_size": size, "strategy": "group",
                        "dynamic": False},
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
        for i, size in enumerate(sizes)
    }
    return {
        "version": compressed_tensors_version(),
        "quant_method": QUANT_METHOD,
        "sparsity_config": {},
        "transform_config": {},
        "config_groups": schemes,
        "kv_cache_scheme": None,
        "format": FORMAT,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "moe_sparsity_config": None,
    }


def compressed_tensors_version() -> str:
    """The installed compressed-tensors' version (from its package metadata: no import)."""
    from importlib.metadata import version

    return version("compressed-tensors")


@dataclass(frozen=True)
class ConfigGroup:
    """One well-formed config group: its name, group size and targets."""

    name: str
    group_size: int
    targets: tuple[str, ...]


@dataclass(frozen=True)
class ConfigCheck:
    """What a ``quantization_config`` says, and what is wrong with it (nothing for a sound one)."""

    problems: tuple[str, ...]
    groups: tuple[ConfigGroup, ...]  # the well-formed groups, in the config's order
    ignore: tuple[str, ...]  # the well-formed entries of ``ignore``

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Every group size, largest first."""
        return tuple(sorted({g.group_size for g in self.groups}, reverse=True))


def check_config(qc: object) -> ConfigCheck:
    """Every problem of a compressed-tensors ``quantization_config`` for int8's layout: 8-bit symmetric int
    weights, group strategy, weight-only, pack-quantized, compressed; each group with its own group size
    and targets (module names, ``re:`` patterns or class names); a valid ``ignore`` list."""
    problems: list[str] = []
    if not isinstance(qc, dict):
        return ConfigCheck((f"{WHERE} is not an object",), (), ())
    want = {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed"}
    for key, value in want.items():
        if qc.get(key) != value:
            problems.append(f"{WHERE}.{key} is {_short(qc.get(key))}, not {value!r}")
    found: list[ConfigGroup] = []
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
        good_size = isinstance(gs, int) and not isinstance(gs, bool) and gs >= 1
        if not good_size:
            problems.append(f"{at}.weights.group_size is {_short(gs)}, not a positive integer")
        if group.get("input_activations") or group.get("output_activations"):
            problems.append(f"{at} quantizes activations; an int8 checkpoint is weight-only")
        fmt = group.get("format")
        if fmt is not None and fmt != FORMAT:
            problems.append(f"{at}.format is {_short(fmt)}, not {FORMAT!r}")
        targets = _targets(group.get("targets"), f"{at}.targets", problems)
        if good_size and targets:
            found.append(ConfigGroup(str(gname), gs, targets))
    problems += _shared_targets(found)
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
    return ConfigCheck(tuple(problems), tuple(found), tuple(ignore))


def _targets(raw: object, at: str, problems: list[str]) -> tuple[str, ...]:
    """A group's well-formed targets (the problems of the others are added to ``problems``)."""
    if not isinstance(raw, list) or not raw:
        problems.append(f"{at} is {_short(raw)}, not a non-empty list of module names, re: patterns or class names")
        return ()
    good = []
    for i, target in enumerate(raw):
        if not isinstance(target, str) or not target or target == "re:":
            problems.append(f"{at}[{i}] is {_short(target)}, not a module name, re: pattern or class name")
        elif target.startswith("re:") and (why := bad_regex(target[3:])):
            problems.append(f"{at}[{i}] {_short(target)} is not a valid regular expression ({why})")
        else:
            good.append(target)
    return tuple(good)


def _shared_targets(groups: list[ConfigGroup]) -> list[str]:
    """A target that two groups of different group sizes both name (which size it gets depends on the loader)."""
    first: dict[str, ConfigGroup] = {}
    problems = []
    for g in groups:
        for target in g.targets:
            other = first.setdefault(target, g)
            if other is not g and other.group_size != g.group_size:
                problems.append(
                    f"{WHERE}: target {_short(target)} is in {_short(other.name)} (group size {other.group_size}) "
                    f"and in {_short(g.name)} (group size {g.group_size})"
                )
    return problems


def _priority(module: str, classes: Sequence[str], target: str) -> int | None:
    """How a target matches a module, as compressed-tensors ranks it: 0 its exact name, 1 a ``re:`` pattern
    (matched at the start of the name), 2 one of its class names; None: it does not."""
    if target.startswith("re:"):
        return 1 if not bad_regex(target[3:]) and re.match(target[3:], module) else None
    if target == module:
        return 0
    return 2 if target in classes else None


def class_names(module: object) -> tuple[str, ...]:
    """The names of a module's classes (its MRO), which class-name targets match."""
    return tuple(c.__name__ for c in type(module).__mro__)


def matching_groups(module: str, classes: Sequence[str], groups: Sequence[ConfigGroup]) -> list[ConfigGroup]:
    """The groups whose targets match ``module`` (of the classes ``classes``, its MRO's names), the one
    compressed-tensors applies first: exact names before ``re:`` patterns before class names (ties:
    the target that sorts first; a target named by several groups belongs to the last)."""
    owner = {t: g for g in groups for t in g.targets}
    ranked = sorted((p, t) for t in owner if (p := _priority(module, classes, t)) is not None)
    ordered: list[ConfigGroup] = []
    for _, t in ranked:
        if owner[t] not in ordered:
            ordered.append(owner[t])
    return ordered


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
