"""The checks of what the checkpoint declares against what it stores: ``config``, ``index`` and ``tensors``."""

from __future__ import annotations

from pathlib import Path

from ..layout import Layout, Reading, ReadState
from ..result import Check, outcome
from ..scan import ShardScan


def check_config(layout: Layout, reading: Reading) -> Check:
    """config.json and its quantization_config; transformers can build the model from it."""
    threshold = "pack-quantized, 8-bit symmetric int, one group size per config group; transformers builds it"
    problems = list(reading.problems)
    if reading.state is not ReadState.READ or layout.config is None:
        return outcome("config", problems, figure=reading.state.value, threshold=threshold)
    dtype = layout.config.get("dtype") or layout.config.get("torch_dtype")
    figure = (
        f"{layout.model_class or '?'}, {_groups(layout)}, dtype {dtype}, scales in {_torch_name(layout.scale_dtype)}"
        if not problems
        else f"{len(problems)} problem(s)"
    )
    return outcome("config", problems, figure=figure, threshold=threshold)


def _groups(layout: Layout) -> str:
    """The group sizes and how many layers each has: 'group size 128', or 'group sizes 128 (30 layers), 64 (180 layers)'."""
    counts = layout.block_sizes
    if len(counts) <= 1:
        sizes = list(counts) or [g.group_size for g in layout.groups]
        return f"group size {', '.join(map(str, sorted(set(sizes), reverse=True))) or '?'}"
    return "group sizes " + ", ".join(f"{size} ({n} layers)" for size, n in counts.items())


def _torch_name(dtype: str | None) -> str:
    from ...hf import TORCH_NAMES

    return TORCH_NAMES.get(dtype or "", "?")


def check_index(layout: Layout, reading: Reading) -> Check:
    """The shard index and the shards' headers agree, tensor by tensor."""
    threshold = "index and shard headers agree, tensor by tensor"
    if reading.state is not ReadState.READ:
        return outcome("index", list(reading.problems), figure=reading.state.value, threshold=threshold)
    figure = f"{len(layout.shards)} shard(s), {len(layout.tensors)} tensors"
    return outcome("index", list(reading.problems), figure=figure, threshold=threshold)


def check_tensors(layout: Layout, reading: Reading, index: Reading, scans: dict[Path, ShardScan]) -> Check:
    """Each quantized layer's packed weight, scale and shape, and every tensor's shape and dtype, as config.json implies."""
    problems = list(reading.problems)
    shapes: dict[str, list[int]] = {}
    for path in layout.shards:
        s = scans[path]
        shapes.update(s.shapes)
        if s.error and path.name not in index.files:  # a shard the index check already faults is not faulted twice
            problems.append(s.error)
    for q in layout.quantized.values():
        if q.shape is not None and q.shape.name in shapes:
            got = shapes[q.shape.name]
            if got != [q.out_features, q.in_features]:
                problems.append(
                    f"{q.shape.file.name}: {q.shape.name} says {got}, but {layout.model_class} built from config.json "
                    f"expects [{q.out_features}, {q.in_features}]"
                )
    return outcome(
        "tensors",
        problems,
        figure=f"{len(layout.quantized)} quantized layers, {len(layout.kept)} other tensors",
        threshold="packed, scale, shape per layer; shapes and dtypes as config.json implies",
    )
