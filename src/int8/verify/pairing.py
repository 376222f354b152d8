"""Each quantized layer's stored tensors paired with the weight the model built from config.json expects.

`pair_layers` finds, for every ``weight_packed``, its ``weight_scale`` and
``weight_shape`` and the config group (hence the block size) compressed-tensors
puts it in, and checks every stored tensor's shape and dtype against the meta
model: what the ``tensors`` check reports.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ..formats.compressed_tensors import LINEAR, class_names, is_ignored, matching_groups, packed_columns
from ..formats.safetensors import FLOAT_DTYPES
from ..hf import WeightLayout, out_in, stored_layout, weight_layout
from .layout import QuantLayer, StoredTensor
from .read import REPORT_NAME, ConfigRead

PACKED, SCALE, SHAPE = ".weight_packed", ".weight_scale", ".weight_shape"
SCALE_DTYPES = ("F32", "F16", "BF16")
"""What `int8 convert --scale-dtype` writes; compressed-tensors de-quantizes ``code * scale`` in it."""


def _where(t: StoredTensor) -> str:
    return f"{t.file.name}: {t.name}"


def pair_layers(tensors: Mapping[str, StoredTensor], cfg: ConfigRead, meta) -> tuple[dict[str, QuantLayer], list[str]]:
    """(quantized layers by module, problems): pair each weight_packed with its scale and shape; check shapes and dtypes."""
    params = {k: tuple(v.shape) for k, v in meta.state_dict(keep_vars=True).items()}
    modules = dict(meta.named_modules())
    cls = type(meta).__name__
    problems: list[str] = []

    def ignored(module: str) -> bool:
        return is_ignored(module, type(modules.get(module)).__name__, cfg.ignore)

    def targeted(module: str) -> bool:  # compressed-tensors would expect it stored packed
        return bool(matching_groups(module, _classes(modules.get(module)), cfg.groups)) and not ignored(module)

    quantized: dict[str, QuantLayer] = {}
    for name, t in sorted(tensors.items()):
        if name.endswith(PACKED):
            layer = _pair(name[: -len(PACKED)], t, tensors, cfg, params, modules, cls, ignored, problems)
            if layer is not None:
                quantized[layer.module] = layer
    _check_others(tensors, quantized, cfg, meta, params, modules, cls, targeted, problems)
    if cfg.scale_dtype is None:  # no report records it (one that does is checked layer by layer above)
        problems += _mixed_scales(quantized)
    return quantized, problems


def _mixed_scales(quantized: Mapping[str, QuantLayer]) -> list[str]:
    """Every layer's scales in one dtype (fp32, fp16 or bf16: compressed-tensors reads one dtype per checkpoint)."""
    by_dtype: dict[str, list[QuantLayer]] = {}
    for q in quantized.values():
        if q.scale.dtype in SCALE_DTYPES:
            by_dtype.setdefault(q.scale.dtype, []).append(q)
    if len(by_dtype) < 2:
        return []
    most = max(by_dtype, key=lambda d: len(by_dtype[d]))
    return [
        f"{_where(q.scale)} is {q.scale.dtype}, but the other layers' scales are {most} (one scale dtype per checkpoint)"
        for d, layers in sorted(by_dtype.items()) if d != most for q in layers
    ]


def _classes(module) -> tuple[str, ...]:
    """The class names a module's targets may match; a Conv1D counts as a ``Linear``, as `int8.load` reads it
    (compressed-tensors itself handles nn.Linear only: such checkpoints load with int8.load)."""
    extra = (LINEAR,) if weight_layout(module) == WeightLayout.CONV1D else ()
    return class_names(module) + extra


def _group_size(mod: str, module, t: StoredTensor, cfg: ConfigRead, problems: list[str]) -> int | None:
    """The group size of the config group compressed-tensors puts ``mod`` in (None: no group, or loaders may disagree)."""
    if not cfg.groups:
        return None  # the config check reports a config without sound groups
    found = matching_groups(mod, _classes(module), cfg.groups)
    if not found:
        problems.append(f"{_where(t)}: no config group of quantization_config targets {mod} (compressed-tensors "
                        "would not expect it packed)")
        return None
    sizes = sorted({g.group_size for g in found}, reverse=True)
    if len(sizes) > 1:
        problems.append(f"{_where(t)}: {mod} is targeted by config groups of group sizes {sizes} "
                        f"({', '.join(g.name for g in found)}); loaders may pick either")
        return None
    gs = found[0].group_size
    recorded = cfg.report_blocks.get(mod)
    if recorded is not None and recorded != gs:
        problems.append(f"{_where(t)}: config.json puts {mod} in a group of group size {gs}, but {REPORT_NAME} "
                        f"records block size {recorded} for it")
    return gs


def _pair(mod, t, tensors, cfg: ConfigRead, params, modules, cls, ignored, problems: list[str]) -> QuantLayer | None:
    scale = tensors.get(f"{mod}{SCALE}")
    shape_t = tensors.get(f"{mod}{SHAPE}")
    if scale is None:
        problems.append(f"{_where(t)} has no {mod}{SCALE} beside it in any shard")
    if shape_t is None:
        problems.append(f"{_where(t)} has no {mod}{SHAPE} beside it in any shard")
    if f"{mod}.weight" in tensors:
        problems.append(f"{mod} is stored both quantized and as a plain {mod}.weight")
    kind = stored_layout(modules.get(mod))  # a linear, or an embedding (int8 convert --embeddings int8)
    if kind is None:
        problems.append(f"{_where(t)}: {mod} is not a linear or embedding layer of {cls} built from config.json")
        return None
    if ignored(mod):
        problems.append(f"{_where(t)}: {mod} is quantized but quantization_config.ignore lists it")
    gs = _group_size(mod, modules.get(mod), t, cfg, problems)
    expected = params.get(f"{mod}.weight")
    if expected is None or len(expected) != 2:
        problems.append(f"{_where(t)}: {cls} has no 2-D weight for {mod}")
        return None
    out_f, in_f = out_in(expected, kind)
    if t.dtype != "I32":
        problems.append(f"{_where(t)} is {t.dtype}, not I32 (four packed int8 codes per int32)")
    elif t.shape != (out_f, packed_columns(in_f)):
        problems.append(
            f"{_where(t)} has shape {list(t.shape)}, but the weight {cls} built from config.json expects is "
            f"[{out_f}, {in_f}], packed as [{out_f}, {packed_columns(in_f)}]"
        )
    if scale is not None:
        if scale.dtype not in SCALE_DTYPES:
            problems.append(f"{_where(scale)} is {scale.dtype}, not a scale dtype (F32, F16 or BF16)")
        elif cfg.scale_dtype and scale.dtype != cfg.scale_dtype:
            problems.append(f"{_where(scale)} is {scale.dtype}, but {REPORT_NAME} records scales in {cfg.scale_dtype}")
        if gs:
            want = (out_f, math.ceil(in_f / gs))
            if in_f % gs:
                problems.append(f"{_where(t)}: {in_f} input features are not a multiple of the group size {gs}")
            if scale.shape != want:
                problems.append(
                    f"{_where(scale)} has shape {list(scale.shape)}, but group size {gs} (config.json's group "
                    f"for {mod}) over [{out_f}, {in_f}] needs {list(want)}"
                )
    if shape_t is not None and (shape_t.dtype != "I64" or shape_t.shape != (2,)):
        problems.append(f"{_where(shape_t)} is {shape_t.dtype} {list(shape_t.shape)}, not I64 [2]")
    if scale is None:
        return None
    return QuantLayer(mod, out_f, in_f, kind, t, scale, shape_t, gs)


def _check_others(tensors, quantized, cfg: ConfigRead, meta, params, modules, cls, targeted, problems: list[str]) -> None:
    """The tensors stored as they are: each one the model needs, none it does not, as config.json implies."""
    tied = dict(getattr(meta, "all_tied_weights_keys", None) or {})
    skip_missing = [re.compile(p) for p in (getattr(meta, "_keys_to_ignore_on_load_missing", None) or [])]
    quantized_weights = {f"{m}.weight" for m in quantized} | {f"{n[: -len(PACKED)]}.weight" for n in tensors if n.endswith(PACKED)}
    for mod_name, module in modules.items():
        if weight_layout(module) and f"{mod_name}.weight" in params and f"{mod_name}.weight" not in quantized_weights:
            if targeted(mod_name) and f"{mod_name}.weight" in tensors:
                problems.append(
                    f"{tensors[f'{mod_name}.weight'].file.name}: {mod_name}.weight is stored unquantized but a config "
                    "group targets it and quantization_config.ignore does not list it (compressed-tensors would "
                    "expect it packed)"
                )
    for name, shape in params.items():
        if name in quantized_weights:
            continue
        t = tensors.get(name)
        if t is None:
            source = tied.get(name)
            if source is not None and (source in tensors or source in quantized_weights):
                continue
            if any(p.search(name) for p in skip_missing):
                continue
            problems.append(f"tensor {name!r}, which {cls} needs, is in no shard")
            continue
        if t.shape != shape:
            problems.append(f"{_where(t)} has shape {list(t.shape)}, but {cls} built from config.json expects {list(shape)}")
        if t.dtype in FLOAT_DTYPES and cfg.dtype and t.dtype not in (cfg.dtype, "F32"):
            problems.append(f"{_where(t)} is {t.dtype}, but config.json's dtype is {cfg.dtype}")
    known = set(params) | {n for q in quantized.values() for n in (q.packed.name, q.scale.name)}
    known |= {f"{m}{SHAPE}" for m in quantized}
    for name, t in sorted(tensors.items()):
        if name not in known and not name.endswith((PACKED, SCALE, SHAPE)):
            problems.append(f"{_where(t)} is not a tensor of {cls} (transformers would report it as unexpected)")
