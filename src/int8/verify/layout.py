"""What verify knows about a converted checkpoint, read once: its files, stored tensors and quantized layers.

`read_layout` reads the small files (the conversion report, config.json, the
shard index and the safetensors headers), builds the model on the ``meta``
device from config.json and pairs each quantized layer's stored tensors with
the weight the model expects. It returns one frozen `Layout` and, for each of
the checks that reading feeds, a `Reading`: the problems found on the way.
The checks (`int8.verify.checks`) and the model-level phases
(`int8.verify.core`) are functions of these; nothing re-reads a header or
rebuilds the model's structure.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

from ..formats.compressed_tensors import ConfigGroup
from ..formats.safetensors import itemsize
from ..hf import NameMap, WeightLayout
from ..report import ConversionReport
from .provenance import Origin, read_origin


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a shard of the converted checkpoint."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of its data in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return (math.prod(self.shape[1:]) if self.shape else 1) * itemsize(self.dtype)

    @property
    def end(self) -> int:
        return self.start + self.nbytes


@dataclass(frozen=True)
class QuantLayer:
    """A quantized linear layer: its three stored tensors and the weight's logical shape."""

    module: str
    out_features: int
    in_features: int
    layout: WeightLayout  # how the model stores the weight (Conv1D: (in, out)); stored packed as (out, in)
    packed: StoredTensor
    scale: StoredTensor
    shape: StoredTensor | None
    block_size: int | None = None  # its config group's group size (None: the config gives none, a fault reported)

    @property
    def group(self) -> int:
        """The block size to decode it with (1 when the config gives none: every value its own block)."""
        return self.block_size or 1


@dataclass(frozen=True)
class Layout:
    """The converted checkpoint as `read_layout` found it (empty where a file could not be read)."""

    folder: Path
    report: ConversionReport | None = None
    config: Mapping[str, Any] | None = None  # config.json as stored
    model_class: str | None = None  # the class transformers builds from config.json (None: it cannot)
    model_type: str | None = None
    seq2seq: bool = False
    groups: tuple[ConfigGroup, ...] = ()  # quantization_config's well-formed config groups
    dtype: str | None = None  # config.json's dtype (of everything not quantized) as a safetensors name (F16...)
    scale_dtype: str | None = None  # the scales' dtype: as int8_report.json records it, else as the layers store it
    tensors: Mapping[str, StoredTensor] = field(default_factory=dict)  # every tensor of the shards, by name
    shards: tuple[Path, ...] = ()  # the shards the index lists that are present (and inside the folder)
    quantized: Mapping[str, QuantLayer] = field(default_factory=dict)  # by module name
    names: NameMap = field(default_factory=lambda: NameMap(frozenset()))  # the state dict names transformers expects
    tied: Mapping[str, str] = field(default_factory=dict)  # tied tensor -> the tensor it copies
    origin: Origin = Origin()  # who wrote it (`int8.verify.provenance`): int8, or another tool
    bnb: bool = False  # bitsandbytes' 8-bit layout (`int8.verify.bnb_structure`): packed is M.weight, scale M.SCB, a row a block

    @cached_property
    def kept(self) -> dict[str, StoredTensor]:
        """The tensors stored as they are (not part of a quantized layer)."""
        mine = {n for q in self.quantized.values() for n in (q.packed.name, q.scale.name, q.shape and q.shape.name)}
        return {n: t for n, t in self.tensors.items() if n not in mine}

    def model_name(self, name: str) -> str:
        """A checkpoint's tensor name as the model names it (`int8.hf.NameMap`)."""
        return self.names.model_name(name)

    @property
    def block_sizes(self) -> dict[int, int]:
        """Block size (largest first) -> how many quantized layers have it."""
        counts = Counter(q.block_size for q in self.quantized.values() if q.block_size)
        return dict(sorted(counts.items(), reverse=True))

    @property
    def conv1d(self) -> bool:
        return any(q.layout == WeightLayout.CONV1D for q in self.quantized.values())

    @property
    def embeddings(self) -> list[str]:
        """The embedding modules stored quantized (``int8 convert --embeddings int8``)."""
        return [q.module for q in self.quantized.values() if q.layout == WeightLayout.EMBEDDING]


class ReadState(Enum):
    """How far reading a file got."""

    READ = "read"
    MISSING = "missing"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Reading:
    """What reading one subject of the checkpoint found wrong."""

    problems: tuple[str, ...] = ()
    state: ReadState = ReadState.READ
    files: frozenset[str] = frozenset()  # the shards the problems are about


@dataclass(frozen=True)
class Readings:
    """The problems of `read_layout`, by the check that reports them."""

    report: Reading = Reading()
    config: Reading = Reading()
    index: Reading = Reading()
    tensors: Reading = Reading()


def model_fields(meta) -> dict[str, Any]:
    """The `Layout` fields the model built on the meta device gives (class, type, task, names, ties); their
    empty values without one (config.json does not describe a model transformers can build)."""
    if meta is None:
        return dict(model_class=None, model_type=None, seq2seq=False, names=NameMap(frozenset()), tied={})
    return dict(
        model_class=type(meta).__name__,
        model_type=meta.config.model_type,
        seq2seq=bool(getattr(meta.config, "is_encoder_decoder", False)),
        names=NameMap.of(meta),
        tied=dict(getattr(meta, "all_tied_weights_keys", None) or {}),
    )


def read_layout(folder: Path, origin: Origin | None = None) -> tuple[Layout, Readings]:
    """Read the checkpoint's small files once; the frozen layout and the problems met on the way.

    ``origin`` is who wrote it (read here when not given): another tool's checkpoint may be a single
    model.safetensors without an index, as transformers' ``save_pretrained`` writes small models."""
    from .pairing import pair_layers
    from .read import read_config, read_index, read_report

    folder = Path(folder)
    origin = origin or read_origin(folder)
    report, report_reading = read_report(folder)
    cfg = read_config(folder, report)
    idx = read_index(folder, single_file=not origin.own)
    quantized: dict[str, QuantLayer] = {}
    tensor_problems: list[str] = []
    if cfg.meta is not None and idx.tensors:
        quantized, tensor_problems = pair_layers(idx.tensors, cfg, cfg.meta)
    elif cfg.meta is None:
        tensor_problems = ["not checked: config.json does not give the model's tensors"]
    meta = cfg.meta
    layout = Layout(
        folder=folder,
        report=report,
        config=cfg.config,
        **model_fields(meta),
        groups=cfg.groups,
        dtype=cfg.dtype,
        scale_dtype=cfg.scale_dtype or _stored_scale_dtype(quantized),
        tensors=idx.tensors,
        shards=idx.shards,
        quantized=quantized,
        origin=origin,
    )
    return layout, Readings(report_reading, cfg.reading, idx.reading, Reading(tuple(tensor_problems)))


def _stored_scale_dtype(quantized: Mapping[str, QuantLayer]) -> str | None:
    """The one dtype every quantized layer's scale is stored in (None: no layer, or they differ)."""
    found = {q.scale.dtype for q in quantized.values()}
    return found.pop() if len(found) == 1 else None
