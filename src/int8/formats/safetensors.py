"""The safetensors format: 8 bytes of little-endian header length, a JSON header, the raw data.

Headers are read here and validated at the edge (every field's type and range, caps on sizes and
counts, duplicate names), so the rest of int8 works from `SourceTensor` descriptions it can trust;
headers are built here for the shards int8 writes; and the shard index (``*.index.json``) is read
and written here. No message ever quotes bytes of a file: names taken from files are shown through
`int8.paths.show`.

No torch here: the CPU converter reads and writes safetensors through numpy (`NUMPY_DTYPES`). The
torch dtype of each name (`DTYPES`, `DTYPE_NAMES`) is built on first use, importing torch then.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CorruptCheckpoint, ResourceLimit
from ..paths import inside, plain, show

SAFE_INDEX = "model.safetensors.index.json"


SAFE_SINGLE = "model.safetensors"


NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # numpy has no bfloat16: its raw bits (`int8.kernels` widens and rounds them)
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
"""How numpy views the bytes of each safetensors dtype (every dtype int8 reads)."""


_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def __getattr__(name: str):
    """``DTYPES`` (safetensors name -> torch dtype) and ``DTYPE_NAMES`` (its inverse), importing torch on first use."""
    if name in ("DTYPES", "DTYPE_NAMES"):
        import torch

        dtypes = {k: getattr(torch, v) for k, v in _TORCH_NAMES.items()}
        globals().update(DTYPES=dtypes, DTYPE_NAMES={v: k for k, v in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_torch(a: np.ndarray, dtype: str):
    """A numpy array holding safetensors dtype ``dtype`` (`NUMPY_DTYPES`) as a torch tensor over the same
    memory. Read-only memory included: such a tensor must never be written."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": views of read-only mappings are only read
        t = torch.from_numpy(a.view(np.int16) if dtype == "BF16" else a)
    return t.view(torch.bfloat16) if dtype == "BF16" else t


def to_numpy(t) -> np.ndarray:
    """A CPU torch tensor's memory as a numpy array of its safetensors dtype (`NUMPY_DTYPES`: bfloat16 as bits)."""
    import torch

    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


MAX_HEADER_BYTES = 16 << 20
"""Largest safetensors header int8 reads. A BLOOM-176B shard's header is about 100 KB, T5-XXL's whole
header about 60 KB: this is over a hundred times what any real checkpoint needs."""


MAX_TENSORS_PER_FILE = 100_000
"""Most tensors one weight file may declare (BLOOM-176B's shards hold under a thousand each)."""


MAX_TENSORS = 200_000
"""Most tensors a whole checkpoint may hold (the largest models int8 converts have a few thousand;
mixture-of-experts giants under a hundred thousand)."""


MAX_INDEX_BYTES = 64 << 20
"""Largest shard index int8 reads (real ones are tens of kilobytes to a few megabytes)."""


MAX_NDIM = 16
"""Most dimensions a tensor may have."""


_DTYPE_LIKE = re.compile(r"[A-Z][A-Z0-9_]{0,11}")


_ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in NUMPY_DTYPES.items()}


def itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a source checkpoint, as its file describes it."""

    name: str
    dtype: str  # safetensors dtype name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # byte offset of the data in `file` (safetensors only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index (tensor name -> shard file), checked at the edge:
    a JSON object whose ``weight_map`` maps text to non-empty text and whose ``metadata``, when
    present, is an object. `CorruptCheckpoint` (or `ResourceLimit`) otherwise."""
    name = index.name
    hint = "Download or save the checkpoint again; the index must be what save_pretrained writes."
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise ResourceLimit(f"{name} is larger than {MAX_INDEX_BYTES >> 20} MiB: no real shard index is", hint)
        data = json.loads(index.read_bytes(), object_pairs_hook=_no_duplicate_keys)
    except OSError as e:
        raise CorruptCheckpoint(f"{name} cannot be read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise CorruptCheckpoint(f"{name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", hint) from None
    except _DuplicateKey as e:
        raise CorruptCheckpoint(f"{name} lists {show(e.key)} twice", hint) from None
    except (ValueError, RecursionError):
        raise CorruptCheckpoint(f"{name} is not valid UTF-8 JSON", hint) from None
    if not isinstance(data, dict):
        raise CorruptCheckpoint(f"{name} is not a JSON object", hint)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptCheckpoint(f"{name} has no weight_map object (tensor name -> shard file name)", hint)
    if not weight_map:
        raise CorruptCheckpoint(f"{name} has an empty weight_map", hint)
    if len(weight_map) > MAX_TENSORS:
        raise ResourceLimit(f"{name} lists more than {MAX_TENSORS:,} tensors: no real model has that many", hint)
    for tname, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise CorruptCheckpoint(f"{name}: weight_map gives tensor {show(tname)} no shard file name", hint)
    if not isinstance(data.get("metadata", {}), (dict, type(None))):
        raise CorruptCheckpoint(f"{name}: metadata is not an object", hint)
    return weight_map


def index_files(index: Path, weight_map: dict[str, str]) -> tuple[Path, ...]:
    """The shard files a weight map names, each inside the index's folder and present."""
    folder = index.parent
    names = sorted(set(weight_map.values()))
    paths = [inside(folder, n, what=f"shard listed in {index.name}") for n in names]
    missing = [n for n, p in zip(names, paths, strict=True) if not p.is_file()]
    if missing:
        raise CorruptCheckpoint(
            f"{index.name} lists shards that are missing from {folder}: {', '.join(plain(n) for n in missing[:5])}",
            "Download the checkpoint again (a Hub download resumes where it stopped).",
        )
    return tuple(dict.fromkeys(paths))  # "a" and "./a" are one file


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__("duplicate key")
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _dtype_shown(dtype: object) -> str:
    """A dtype name from a header, printed only when it looks like one (short, upper-case)."""
    if isinstance(dtype, str) and _DTYPE_LIKE.fullmatch(dtype):
        return dtype
    return "that is not a safetensors dtype name"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(info: object) -> tuple[str, tuple[int, ...], int, int] | str:
    """(dtype, shape, begin, end) of a header entry, or what is wrong with it (no raw value quoted)."""
    if not isinstance(info, dict):
        return "has a header entry that is not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        return "has no dtype (or one that is not text)"
    if dtype not in NUMPY_DTYPES:
        return f"has dtype {_dtype_shown(dtype)}, which int8 does not read"
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        return f"has a shape that is not a list of at most {MAX_NDIM} non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        return "has data_offsets that are not two integers"
    b, e = offsets
    if b < 0 or e < b:
        return "has data_offsets that are negative or reversed"
    shape_t = tuple(shape)
    need = math.prod(shape_t) * itemsize(dtype)
    if e - b != need:
        return f"has data_offsets spanning {e - b} bytes, but {dtype} {list(shape_t)[:8]} takes {need}"
    return dtype, shape_t, b, e


def scan_safetensors_header(path: Path) -> tuple[list[SourceTensor], int, list[str]]:
    """Parse a safetensors header, collecting every problem instead of stopping at the first.

    Returns the tensors sorted by offset (``offset`` absolute in the file), the
    byte where the data starts, and the problems (none for a sound file): a
    header that cannot be read, malformed or overlapping entries, unknown
    dtypes, and tensors cut off by truncation (the first one named). No problem
    quotes bytes of the file: tensor names are escaped and cut, numbers are sizes.
    """
    name = path.name
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            return [], 0, [f"{name} is truncated to {size} bytes: not even a safetensors header"]
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > size - 8:
            return [], 0, [f"{name} is not a safetensors file, or is truncated ({size} bytes): its header length field is invalid"]
        if n > MAX_HEADER_BYTES:
            return [], 0, [f"{name} declares a safetensors header larger than int8's limit of {MAX_HEADER_BYTES >> 20} MiB"]
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        return [], 0, [f"{name}: the safetensors header lists {show(e.key)} twice"]
    except json.JSONDecodeError as e:
        return [], 0, [f"{name} has a corrupt safetensors header (not valid JSON: {e.msg} at byte {e.pos})"]
    except (ValueError, RecursionError):
        return [], 0, [f"{name} has a corrupt safetensors header (not valid UTF-8 JSON)"]
    if not isinstance(header, dict):
        return [], 0, [f"{name} has a corrupt safetensors header (not a JSON object)"]
    if len(header) - ("__metadata__" in header) > MAX_TENSORS_PER_FILE:
        return [], 0, [f"{name} declares more than {MAX_TENSORS_PER_FILE:,} tensors: no real checkpoint shard has that many"]
    start = 8 + n
    problems: list[str] = []
    tensors: list[SourceTensor] = []
    for tname, info in header.items():
        if tname == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                problems.append(f"{name}: the safetensors __metadata__ is not a map of text to text")
            continue
        parsed = _parse_entry(info)
        if isinstance(parsed, str):
            problems.append(f"{name}: tensor {show(tname)} {parsed}")
            continue
        dtype, shape, b, _ = parsed
        tensors.append(SourceTensor(tname, dtype, shape, path, start + b))
    tensors.sort(key=lambda t: t.offset)
    for a, b in itertools.pairwise(tensors):
        if b.offset < a.offset + a.nbytes:
            problems.append(f"{name}: tensors {show(a.name)} and {show(b.name)} overlap in the file")
    cut = [t for t in tensors if t.offset + t.nbytes > size]
    if cut:
        problems.append(
            f"{name} is truncated: {size} bytes, but tensor {show(cut[0].name)} ends at byte {cut[0].offset + cut[0].nbytes}"
            + (f" ({len(cut) - 1} more tensor(s) after it are cut off too)" if len(cut) > 1 else "")
        )
    return tensors, start, problems


def read_safetensors_header(path: Path) -> list[SourceTensor]:
    """The tensors of a sound safetensors file, sorted by offset; `CorruptCheckpoint` otherwise."""
    tensors, _, problems = scan_safetensors_header(path)
    if problems:
        raise CorruptCheckpoint(f"{path}: {problems[0]}", "Download or save the checkpoint again.")
    return tensors


def safetensors_header(tensors: Sequence[OutputTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The header bytes (length prefix included) for ``tensors`` laid out in order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output checkpoint."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> Path:
    """``folder/model.safetensors.index.json`` as transformers writes it: total size, tensor -> shard, sorted."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    path = Path(folder) / SAFE_INDEX
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path
