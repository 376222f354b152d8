"""bitsandbytes' serialized 8-bit layout (LLM.int8), as transformers' ``save_pretrained`` writes it and
``from_pretrained`` reads it back into ``bnb.nn.Linear8bitLt`` layers.

Each quantized linear ``M`` is stored as three tensors: ``M.weight`` (int8 ``(out, in)``, the codes of
`int8.rowwise`, a GPT-2 ``Conv1D`` weight transposed to ``(out, in)`` as transformers does),
``M.SCB`` (float32 ``(out,)``: each row's absmax) and ``M.weight_format`` (a uint8 scalar, 0 for
bitsandbytes' "row" format); its bias, if any, stays ``M.bias``. ``config.json`` carries a
``quantization_config`` that is transformers' own ``BitsAndBytesConfig(load_in_8bit=True, ...).to_dict()``.
The config's rules are checked here (one set of rules, for `int8 verify` and for loaders).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from .safetensors import OutputTensor

QUANT_METHOD = "bitsandbytes"
WEIGHT, SCB, WEIGHT_FORMAT = "weight", "SCB", "weight_format"
"""The tensor names of a quantized layer ``M``: ``M.weight``, ``M.SCB``, ``M.weight_format``."""
ROW_FORMAT = 0
"""``weight_format`` of a row-major int8 weight (bitsandbytes' ``LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING['row']``)."""
THRESHOLD = 6.0
"""``llm_int8_threshold``: transformers' default; activations beyond it go through the fp16 path at run time."""
WHERE = "config.json: quantization_config"


def outputs(module: str, out_features: int, in_features: int) -> list[OutputTensor]:
    """The tensors a quantized linear ``module`` becomes, in the order int8 writes them."""
    return [
        OutputTensor(f"{module}.{WEIGHT}", "I8", (out_features, in_features)),
        OutputTensor(f"{module}.{SCB}", "F32", (out_features,)),
        OutputTensor(f"{module}.{WEIGHT_FORMAT}", "U8", ()),
    ]


def weight_format_bytes() -> bytes:
    """The data of a ``weight_format`` tensor: one uint8, `ROW_FORMAT`."""
    return bytes([ROW_FORMAT])


def build_config(skip_modules: Sequence[str], threshold: float = THRESHOLD) -> dict[str, Any]:
    """The ``quantization_config`` transformers writes for ``BitsAndBytesConfig(load_in_8bit=True,
    llm_int8_skip_modules=skip_modules)``: built by transformers itself, as JSON values.

    ``skip_modules`` must name every linear kept unquantized (the output head included): given a
    list, transformers no longer adds its own defaults when it loads the model."""
    import json

    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules), llm_int8_threshold=threshold)
    return json.loads(json.dumps(qc.to_dict()))


def is_skipped(module: str, patterns: Sequence[str] | None) -> bool:
    """Whether transformers leaves ``module`` unconverted for ``llm_int8_skip_modules`` ``patterns``: each is
    matched from the start of the name up to a module boundary (as a regular expression), or as a plain
    suffix of the name (transformers' ``should_convert_module``, 5.x)."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in patterns or ():
        try:
            if re.match(rf"(?:{key}){boundary}", module):
                return True
        except re.error:
            pass
        if module.endswith(key):
            return True
    return False


def check_config(qc: object) -> list[str]:
    """Every problem of a bitsandbytes ``quantization_config`` for int8's 8-bit layout."""
    if not isinstance(qc, dict):
        return [f"{WHERE} is not an object"]
    problems = []
    want = {"quant_method": QUANT_METHOD, "load_in_8bit": True, "load_in_4bit": False, "llm_int8_has_fp16_weight": False}
    for key, value in want.items():
        if qc.get(key) != value:
            problems.append(f"{WHERE}.{key} is {_short(qc.get(key))}, not {value!r}")
    threshold = qc.get("llm_int8_threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        problems.append(f"{WHERE}.llm_int8_threshold is {_short(threshold)}, not a finite number >= 0")
    skip = qc.get("llm_int8_skip_modules")
    if skip is not None:
        if not isinstance(skip, list) or not all(isinstance(s, str) and s for s in skip):
            problems.append(f"{WHERE}.llm_int8_skip_modules is {_short(skip)}, not a list of module names")
        else:
            for s in skip:
                try:
                    re.compile(s)
                except re.error as e:
                    problems.append(f"{WHERE}.llm_int8_skip_modules entry {_short(s)} is not a valid regular expression ({e})")
    return problems


def skip_modules(qc: dict) -> list[str] | None:
    skip = qc.get("llm_int8_skip_modules")
    return [s for s in skip if isinstance(s, str)] if isinstance(skip, list) else None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


REPORT_FORMAT = "bitsandbytes int8 (LLM.int8 row-wise)"
"""``quantization.format`` of int8's report for this layout (compressed-tensors outputs say ``compressed-tensors ...``)."""
REPORT_SCHEME = "absmax, one float32 scale (SCB) per output row; outliers decomposed at run time, not in the weights"
REPORT_ROUNDING = (
    "w16 = w cast to float16; SCB = max|w16| per row; q = round_half_even(w16 * (127.0 / SCB)) in float32 "
    "(0 for a zero row), as bitsandbytes' int8_vectorwise_quant"
)


def is_report_format(text: str) -> bool:
    return text.startswith("bitsandbytes")
