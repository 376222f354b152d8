"""Which quantization scheme a checkpoint's config.json declares, and whether `int8 verify` can check it.

`int8 verify` checks one scheme: compressed-tensors ``pack-quantized``, 8-bit
symmetric int weights in groups along the input dimension, nothing else
quantized (no activations, no KV cache, no sparsity, no transforms). int8
writes it; llm-compressor's ``W8A16`` (``model_free_ptq`` or ``oneshot``)
writes it too. A checkpoint another tool wrote in any other scheme (4-bit
weights, W8A8, FP8, NVFP4, a GPTQ or AWQ config, ...) gets a clear
"not an 8-bit weight-only checkpoint" from `unsupported_scheme` instead of a
verdict made of checks that do not apply to it.

Pure functions of the parsed config.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..formats.compressed_tensors import FORMAT, QUANT_METHOD

NOT_W8 = "not an 8-bit weight-only checkpoint"
"""The start of the finding for a scheme of other bits, types, formats, or with activations quantized."""
OTHER_W8 = "an 8-bit weight-only scheme int8 verify does not check"
"""The start of the finding for 8-bit int weight-only schemes of another layout (asymmetric, per channel, ...)."""


def unsupported_scheme(config: Mapping[str, Any] | None) -> str:
    """Why config.json's quantization is not the one scheme `int8 verify` checks ("" when it is, or when
    config.json gives too little to tell: the config check reports a missing or malformed one)."""
    if not isinstance(config, Mapping):
        return ""
    qc = config.get("quantization_config")
    if qc is None:
        return f"{NOT_W8}: config.json has no quantization_config (the weights are not quantized)"
    if not isinstance(qc, Mapping):
        return ""
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        return f"{NOT_W8}: quant_method {_short(method)} (int8 verify checks compressed-tensors checkpoints)"
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        return ""
    schemes = [describe_group(g) for g in groups.values() if isinstance(g, Mapping)]
    shown = "; ".join(dict.fromkeys(s for s, _ in schemes))
    top = qc.get("format")
    extras = [
        f"{what} {_short(qc.get(key))}"
        for key, what in (("kv_cache_scheme", "KV cache quantized:"), ("sparsity_config", "sparsity"),
                          ("transform_config", "transforms"))
        if qc.get(key)
    ]
    if top not in (None, FORMAT) and not any(isinstance(g, Mapping) and g.get("format") == top for g in groups.values()):
        extras.append(f"format {_short(top)}")
    kinds = {kind for _, kind in schemes}
    if kinds & {"other"} or extras:
        return f"{NOT_W8}: " + "; ".join([shown, *extras] if shown else extras)
    if kinds & {"layout"}:
        return f"{OTHER_W8}: {shown}"
    return ""


def describe_group(group: Mapping[str, Any]) -> tuple[str, str]:
    """(a config group's scheme in words, its kind): kind "ok" for 8-bit symmetric int weights in groups,
    pack-quantized, weight-only; "layout" for other 8-bit int weight-only layouts; "other" for the rest."""
    w = group.get("weights")
    fmt = group.get("format")
    acts = [(name, group.get(key)) for key, name in (("input_activations", "input"), ("output_activations", "output"))]
    acts = [(name, a) for name, a in acts if a]
    if not isinstance(w, Mapping):
        words = ["no weight quantization"]
        kind = "other"
    else:
        bits, typ = w.get("num_bits"), w.get("type")
        words = [f"{_value(bits)}-bit {_value(typ)} weights {_strategy(w)}"]
        if w.get("symmetric") is False:
            words.append("asymmetric (zero points)")
        if w.get("actorder"):
            words.append(f"activation order {_short(w.get('actorder'))}")
        if w.get("dynamic"):
            words.append("dynamic")
        kind = "ok"
        if bits != 8 or typ != "int":
            kind = "other"
        elif w.get("symmetric") is False or w.get("strategy") != "group" or w.get("actorder") or w.get("dynamic"):
            kind = "layout"
    for name, a in acts:
        bits = a.get("num_bits") if isinstance(a, Mapping) else None
        typ = a.get("type") if isinstance(a, Mapping) else None
        words.append(f"{name} activations quantized ({_value(bits)}-bit {_value(typ)})")
        kind = "other"
    if fmt is not None:
        words.append(f"format {fmt}" if isinstance(fmt, str) else f"format {_short(fmt)}")
        if fmt != FORMAT:
            kind = "other"
    return ", ".join(words), kind


def _strategy(w: Mapping[str, Any]) -> str:
    strategy = w.get("strategy")
    if strategy == "group":
        return f"in groups of {_value(w.get('group_size'))}"
    if strategy == "channel":
        return "per output channel"
    if strategy == "tensor":
        return "per tensor"
    if strategy == "block":
        return f"in blocks of {_value(w.get('block_structure'))}"
    return f"strategy {_short(strategy)}"


def _value(v: object) -> str:
    return str(v) if isinstance(v, (int, str)) and not isinstance(v, bool) else _short(v)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
