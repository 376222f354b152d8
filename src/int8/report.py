"""The conversion report: what `int8 convert` did, for `int8 verify` and the model card.

Written as ``int8_report.json`` in every converted folder. Schema
``int8.conversion/1``:

* ``source``: where the weights came from (preset, Hub id + revision + commit,
  or local path) and their on-disk format;
* ``model``: the transformers class and model type;
* ``quantization``: scheme, bits, block size (the preferred, largest one), dtypes
  (``dtype``: everything not quantized; ``scale_dtype``: the scales; a report
  written before that field existed had its scales in ``dtype``, and loads so),
  the unquantized Linear modules (``ignore``), the rounding rule, and
  ``block_groups``: which block size how many layers got, and their input widths;
* ``totals``: bytes in and out, ratio, seconds (the whole conversion after
  the download) and stream seconds (reading, quantizing and writing the
  tensors), throughput (GB of input per second of streaming), the device;
* ``tensors``: one entry per source tensor: ``quantized`` (shape, its block size,
  blocks, the max and mean absolute error in units of each block's scale — at most
  0.5 by construction), ``kept`` (stored dtype and why it was not quantized) or
  ``dropped`` (a tied copy, or a tensor the model does not use);
* ``files``: every file of the folder except README.md and this report, with
  its size and SHA-256 — the manifest `int8 verify` checks.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .files import REPORT_NAME

SCHEMA = "int8.conversion/1"

_CACHE_SNAPSHOT = re.compile(r"models--[^/]+?--[^/]+/snapshots/[0-9a-f]{40}")


class InvalidReport(ValueError):
    """An int8_report.json that is not a conversion report (the message names the field)."""


def public_source_id(kind: str, ident: str) -> str:
    """What the report records as the source: a preset's or Hub repo's id as is; a local folder by its name
    (no absolute path is published; a folder inside a Hub cache keeps ``models--OWNER--NAME/snapshots/SHA``)."""
    if kind != "local":
        return ident
    m = _CACHE_SNAPSHOT.search(Path(ident).as_posix())
    return m.group(0) if m else Path(ident).name


@dataclass
class SourceInfo:
    kind: str  # "preset", "hub" or "local"
    id: str  # repo id, or the local folder's path
    preset: str | None = None
    revision: str | None = None
    commit: str | None = None
    format: str = ""  # "safetensors" or "pytorch"
    files: list[str] = field(default_factory=list)


@dataclass
class ModelInfo:
    architecture: str
    model_type: str
    task: str  # "causal-lm" or "seq2seq-lm"


@dataclass
class BlockGroup:
    """The quantized layers that got one block size (one compressed-tensors config group)."""

    block_size: int
    layers: int
    input_widths: list[int] = field(default_factory=list)


@dataclass
class QuantizationInfo:
    block_size: int  # the preferred (largest) block size; a layer whose width it does not divide gets a smaller one
    dtype: str  # dtype of the unquantized tensors
    ignore: list[str] = field(default_factory=list)
    bits: int = 8
    symmetric: bool = True
    scheme: str = "absmax, one scale per block along the input dimension"
    rounding: str = (
        "q = clamp(round_half_even(w / scale), -127, 127), scale = absmax / 127 in float32 rounded to nearest into scale_dtype"
    )
    format: str = "compressed-tensors pack-quantized"
    scale_dtype: str = ""  # dtype of the scales; "" (a report written before the field existed): ``dtype``
    block_groups: list[BlockGroup] = field(default_factory=list)  # by block size, largest first
    embeddings: str = "keep"  # `int8 convert --embeddings`: "int8" when the token embeddings and head are quantized

    def __post_init__(self) -> None:
        if not self.scale_dtype:
            self.scale_dtype = self.dtype


@dataclass
class Totals:
    bytes_in: int
    bytes_out: int
    seconds: float
    device: str
    tensors_quantized: int
    tensors_kept: int
    tensors_dropped: int
    params_quantized: int
    params_kept: int
    stream_seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.bytes_in / self.bytes_out if self.bytes_out else 0.0

    @property
    def throughput_gb_s(self) -> float:
        seconds = self.stream_seconds or self.seconds
        return self.bytes_in / seconds / 1e9 if seconds else 0.0


@dataclass
class TensorReport:
    name: str
    action: str  # "quantized", "kept" or "dropped"
    shape: list[int]
    source_dtype: str
    dtype: str | None = None  # kept: stored dtype; quantized: scale dtype
    reason: str = ""
    layout: str | None = None  # quantized: "linear", "conv1d" or "embedding" (--embeddings int8)
    block_size: int | None = None  # quantized: values per scale (a report written before the field: the report's)
    blocks: int | None = None
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    zero_blocks: int | None = None
    tied_to: str | None = None


@dataclass
class FileEntry:
    name: str
    bytes: int
    sha256: str


@dataclass
class ConversionReport:
    int8_version: str
    created: str
    source: SourceInfo
    model: ModelInfo
    quantization: QuantizationInfo
    totals: Totals
    tensors: list[TensorReport]
    files: list[FileEntry]
    warnings: list[str] = field(default_factory=list)
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        # A report written before blocks were chosen per layer: every layer has the one block size.
        for t in self.tensors:
            if t.action == "quantized" and t.block_size is None:
                t.block_size = self.quantization.block_size
        if not self.quantization.block_groups:
            self.quantization.block_groups = block_groups(self.tensors)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["totals"]["ratio"] = round(self.totals.ratio, 4)
        d["totals"]["throughput_gb_s"] = round(self.totals.throughput_gb_s, 4)
        return {"schema": d.pop("schema"), **d}

    def save(self, folder: Path) -> Path:
        path = Path(folder) / REPORT_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: Any) -> ConversionReport:
        """Validate ``d`` (the parsed JSON) against the schema; `InvalidReport` says what is wrong, field by field."""
        from pydantic import TypeAdapter, ValidationError

        if not isinstance(d, dict):
            raise InvalidReport(f"{REPORT_NAME} holds a JSON {type(d).__name__}, not an object")
        data = {k: v for k, v in d.items() if k in _FIELDS}
        data.setdefault("schema", SCHEMA)
        try:
            report = _adapter(TypeAdapter).validate_python(data)
        except ValidationError as e:
            raise InvalidReport(f"{REPORT_NAME} does not follow {SCHEMA}: {_explain(e)}") from None
        for i, f in enumerate(report.files):
            if not f.name.strip():
                raise InvalidReport(f"{REPORT_NAME} does not follow {SCHEMA}: files.{i}.name is empty")
        return report

    @classmethod
    def load(cls, folder: Path) -> ConversionReport:
        """Read and validate ``folder/int8_report.json``. Raises `OSError` (unreadable) or `InvalidReport`."""
        try:
            data = json.loads((Path(folder) / REPORT_NAME).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise InvalidReport(f"{REPORT_NAME} is not UTF-8 text") from None
        except ValueError as e:
            raise InvalidReport(f"{REPORT_NAME} is not valid JSON ({e})") from None
        return cls.from_dict(data)

    @property
    def quantized(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.action == "quantized"]

    @property
    def quantized_embeddings(self) -> list[str]:
        """The token embeddings stored quantized (``--embeddings int8``), by tensor name."""
        return [t.name for t in self.quantized if t.layout == "embedding"]


def in_width(t: TensorReport) -> int:
    """A quantized tensor's input dimension (a Conv1D weight is stored ``(in, out)``)."""
    return t.shape[0] if t.layout == "conv1d" else t.shape[-1]


def block_groups(tensors: list[TensorReport]) -> list[BlockGroup]:
    """The quantized tensors by block size, largest first."""
    by_size: dict[int, list[TensorReport]] = {}
    for t in tensors:
        if t.action == "quantized" and t.block_size is not None:
            by_size.setdefault(t.block_size, []).append(t)
    return [
        BlockGroup(size, len(ts), sorted({in_width(t) for t in ts}))
        for size, ts in sorted(by_size.items(), reverse=True)
    ]


_FIELDS = {f.name for f in fields(ConversionReport)}
_ADAPTER: list = []


def _adapter(type_adapter):
    if not _ADAPTER:
        _ADAPTER.append(type_adapter(ConversionReport))
    return _ADAPTER[0]


def _explain(e) -> str:
    """pydantic's errors, one short phrase each: where, what."""
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ())) or "the top level"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = e.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
