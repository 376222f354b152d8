"""Read source checkpoints tensor by tensor, row range by row range, in flat memory.

Two on-disk forms are read:

* safetensors (single or sharded with ``model.safetensors.index.json``): the
  header is parsed here (the format is 8 bytes of little-endian length, then a
  JSON header, then raw data) and row ranges are read with ``pread`` into the
  caller's buffer. The ``safetensors`` library has no way to read a slice into
  a caller's buffer without mapping the whole file into the process, and the
  mapped pages would count against the memory of a 24 GB conversion.
* PyTorch ``pytorch_model.bin`` (single or sharded): loaded with
  ``torch.load(mmap=True, weights_only=True)`` so no arbitrary object is ever
  unpickled and no tensor is read until it is used. After a row range has been
  copied out, its pages are dropped from the process with ``madvise`` so the
  resident set stays flat.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import mmap
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptCheckpoint, NoWeightsFound, ResourceLimit, SourceChanged, UnsupportedModel
from .paths import inside, plain, show

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

SIDECAR_FILES = (
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template.*",
    "LICENSE*",
)
"""Files besides config.json and the weights that a checkpoint folder carries (tokenizer,
generation settings, license); the converter copies them unchanged."""

# Weight files of other frameworks that int8 never reads (and never copies).
FOREIGN_WEIGHTS = ("*.h5", "*.msgpack", "*.ckpt", "*.onnx", "*.gguf", "*.pt", "*.pth", "*.ot", "*.tflite")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
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


_ITEMSIZE: dict[str, int] = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}


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


@dataclass(frozen=True)
class CheckpointFiles:
    """Where a folder's weights are: one format, one or more files."""

    format: str  # "safetensors" or "pytorch"
    files: tuple[Path, ...]
    index: Path | None

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def find_checkpoint(folder: Path) -> CheckpointFiles:
    """Locate the weights in ``folder``: safetensors when present, else ``.bin``.

    Every weight file (and the index) must lie inside ``folder`` after resolution (`int8.paths`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NoWeightsFound(f"{folder} is not a folder")
    for index_name, single, fmt in ((SAFE_INDEX, SAFE_SINGLE, "safetensors"), (BIN_INDEX, BIN_SINGLE, "pytorch")):
        index = folder / index_name
        if index.is_file() or index.is_symlink():
            inside(folder, index_name, what="index")
            files = index_files(index, read_index(index))
            return CheckpointFiles(fmt, files, index)
        if (folder / single).is_file() or (folder / single).is_symlink():
            path = inside(folder, single, what="weight file")
            if not path.is_file():
                raise CorruptCheckpoint(f"{folder}: {single} is a broken link", "Download or save the checkpoint again.")
            return CheckpointFiles(fmt, (path,), None)
    loose = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if loose:
        raise NoWeightsFound(
            f"{folder} has weight files ({', '.join(p.name for p in loose[:3])}) but no "
            f"{SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}",
            "Save the model with transformers' save_pretrained, or add the index file that lists the shards.",
        )
    foreign = [p.name for pat in FOREIGN_WEIGHTS for p in folder.glob(pat)]
    hint = "int8 reads safetensors and PyTorch .bin checkpoints as written by transformers' save_pretrained."
    if foreign:
        hint += f" This folder has {', '.join(sorted(foreign)[:3])}: load it with transformers and save_pretrained it first."
    raise NoWeightsFound(f"no model weights in {folder}", hint)


# --------------------------------------------------------------------------- the shard index


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


# --------------------------------------------------------------------------- safetensors headers


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
    if dtype not in DTYPES:
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


CHANGED_HINT = (
    "Another program changed the checkpoint while int8 read it (a download or a save still running?): "
    "let it finish, then run int8 again."
)


def _madvise_dontneed(addr: int, length: int) -> None:
    """Drop the whole pages inside [addr, addr+length) from this process (best effort)."""
    page = mmap.PAGESIZE
    start = (addr + page - 1) // page * page
    end = (addr + length) // page * page
    if end > start and _libc is not None:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


def _noop() -> None:
    pass


try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    _libc.mmap.restype = ctypes.c_void_p
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _libc = None
_MAP_ZERO = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10 | 0x4000  # | MAP_FIXED | MAP_NORESERVE (Linux)


class CheckpointReader:
    """All tensors of a checkpoint, readable by row ranges into caller buffers."""

    def __init__(self, files: CheckpointFiles):
        self.files = files
        self.tensors: list[SourceTensor] = []
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._bin: dict[str, torch.Tensor] = {}
        self._sizes: dict[Path, int] = {}
        try:
            index_map = self._index_map()
            if files.format == "safetensors":
                self._open_safetensors(index_map)
            else:
                self._open_bin(index_map)
        except BaseException:
            self.close()
            raise

    def _index_map(self) -> dict[str, str] | None:
        if self.files.index is None:
            return None
        return read_index(self.files.index)

    def _check_index(self, index_map: dict[str, str] | None, found: dict[str, Path]) -> None:
        if index_map is None:
            return
        folder = self.files.index.parent
        for name, fname in index_map.items():
            if found.get(name) is None or found[name] != folder / fname:
                raise CorruptCheckpoint(
                    f"{self.files.index.name} says tensor {show(name)} is in {plain(fname)}, but it is not there",
                    "The shards and their index disagree: download or save the checkpoint again.",
                )

    def _add(self, t: SourceTensor, found: dict[str, Path]) -> None:
        """Record a tensor; the same name in two places is a corrupt checkpoint (which copy loads?)."""
        if t.name in found:
            where = "twice in " + t.file.name if found[t.name] == t.file else f"in both {found[t.name].name} and {t.file.name}"
            raise CorruptCheckpoint(
                f"tensor {show(t.name)} is stored {where}",
                "A checkpoint holds each tensor once: download or save it again.",
            )
        if len(found) >= MAX_TENSORS:
            raise ResourceLimit(f"the checkpoint holds more than {MAX_TENSORS:,} tensors: no real model has that many")
        found[t.name] = t.file
        self.tensors.append(t)

    def _open_fd(self, path: Path, end: int) -> int:
        """A descriptor of ``path``, whose size is checked against ``end`` (where its last tensor ends)
        right before it is mapped; the size is kept so each later read can check it again."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._fds[path] = fd
        size = os.fstat(fd).st_size
        if size < end:
            raise SourceChanged(
                f"{path.name} is {size} bytes, but its tensors end at byte {end}: it was truncated while int8 read it",
                CHANGED_HINT,
            )
        self._sizes[path] = size
        return fd

    def _check_size(self, path: Path) -> None:
        """Refuse to read from a file that shrank since it was opened (mapped pages past the new end
        would kill the process with SIGBUS)."""
        fd = self._fds.get(path)
        if fd is None:
            return
        size = os.fstat(fd).st_size
        if size < self._sizes[path]:
            raise SourceChanged(
                f"{path.name} shrank from {self._sizes[path]} to {size} bytes while int8 was reading it", CHANGED_HINT
            )

    def changed_file(self) -> Path | None:
        """The first source file that is smaller now than when it was opened, if any."""
        for path, fd in self._fds.items():
            try:
                if os.fstat(fd).st_size < self._sizes.get(path, 0):
                    return path
            except OSError:
                return path
        return None

    def _open_safetensors(self, index_map: dict[str, str] | None) -> None:
        found: dict[str, Path] = {}
        for path in self.files.files:
            tensors = read_safetensors_header(path)
            for t in tensors:
                self._add(t, found)
            fd = self._open_fd(path, max((t.offset + t.nbytes for t in tensors), default=0))
            if self._sizes[path]:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                mm.madvise(mmap.MADV_SEQUENTIAL)
                self._maps[path] = mm
        self._check_index(index_map, found)

    def _open_bin(self, index_map: dict[str, str] | None) -> None:
        found: dict[str, Path] = {}
        for path in self.files.files:
            state = _load_bin(path)
            for name, t in state.items():
                if not isinstance(t, torch.Tensor):
                    raise CorruptCheckpoint(f"{path.name}: entry {show(name)} is a {type(t).__name__}, not a tensor")
                if t.dtype not in DTYPE_NAMES:
                    raise UnsupportedModel(f"{path.name}: tensor {show(name)} has dtype {t.dtype}, which int8 does not convert")
                self._add(SourceTensor(name, DTYPE_NAMES[t.dtype], tuple(t.shape), path), found)
                self._bin[name] = t
            self._open_fd(path, 0)
        self._check_index(index_map, found)

    def zero_mappings(self) -> None:
        """Put zero pages in place of every source mapping (same addresses, read-only, no memory).

        Called from the SIGBUS handler of the pipeline when a source file was truncated under its
        mapping: a thread stuck re-faulting on a page past the new end of the file reads zeros and
        goes on, and the run, marked failed, stops. The mappings are unusable afterwards (close()
        still unmaps them)."""
        if _libc is None:
            return
        page = mmap.PAGESIZE
        for addr, length in self.mapped_ranges():
            start = addr // page * page
            end = -(-(addr + length) // page) * page
            _libc.mmap(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.PROT_READ, _MAP_ZERO, -1, 0)

    def mapped_ranges(self) -> list[tuple[int, int]]:
        """(address, length) of every mapping of source bytes this reader reads through."""
        ranges = []
        for mm in self._maps.values():
            if not mm.closed and len(mm):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    ranges.append((torch.frombuffer(mm, dtype=torch.uint8).data_ptr(), len(mm)))
        for t in self._bin.values():
            st = t.untyped_storage()
            if st.nbytes():
                ranges.append((st.data_ptr(), st.nbytes()))
        return ranges

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def shares_storage(self, a: SourceTensor, b: SourceTensor) -> bool:
        """Whether two tensors are views of the same bytes (tied weights in a .bin)."""
        ta, tb = self._bin.get(a.name), self._bin.get(b.name)
        return (
            ta is not None
            and tb is not None
            and ta.data_ptr() == tb.data_ptr()
            and ta.shape == tb.shape
            and ta.stride() == tb.stride()
        )

    def read_rows(self, t: SourceTensor, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Copy rows ``[r0, r1)`` of ``t`` into ``out`` (a flat byte buffer); return them as a tensor."""
        count = (r1 - r0) * t.row_numel
        nbytes = count * itemsize(t.dtype)
        view = out[:nbytes]
        self._check_size(t.file)
        if t.name in self._bin:
            src = self._bin[t.name]
            flat = src.reshape(-1) if src.is_contiguous() else src.contiguous().reshape(-1)
            part = flat[r0 * t.row_numel : r0 * t.row_numel + count]
            view.view(DTYPES[t.dtype]).copy_(part)
            if src.is_contiguous():
                _madvise_dontneed(part.data_ptr(), nbytes)
        else:
            fd = self._fds[t.file]
            mv = memoryview(view.numpy())
            pos = t.offset + r0 * t.row_numel * itemsize(t.dtype)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [mv[done:]], pos + done)
                if got <= 0:
                    raise SourceChanged(f"{t.file.name} ended while int8 was reading tensor {show(t.name)}: it was truncated",
                                        CHANGED_HINT)
                done += got
        shape = (r1 - r0, *t.shape[1:]) if t.shape else ()
        return view.view(DTYPES[t.dtype]).view(shape)

    def view_rows(self, t: SourceTensor, r0: int, r1: int) -> tuple[torch.Tensor, Callable[[], None]]:
        """Rows ``[r0, r1)`` of ``t`` without copying: a view of the page cache through a read-only
        mapping, and the function that drops those pages from this process once the view is no longer
        used (the data stays in the page cache; the resident set stays flat). Never write to the view."""
        count = (r1 - r0) * t.row_numel
        nbytes = count * itemsize(t.dtype)
        shape = (r1 - r0, *t.shape[1:]) if t.shape else ()
        self._check_size(t.file)
        if t.name in self._bin:
            src = self._bin[t.name]
            if not src.is_contiguous():
                buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
                return self.read_rows(t, r0, r1, buf), _noop
            part = src.reshape(-1)[r0 * t.row_numel : r0 * t.row_numel + count]
            return part.view(shape), lambda: _madvise_dontneed(part.data_ptr(), nbytes)
        mm = self._maps.get(t.file)
        if mm is None or nbytes == 0:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            return self.read_rows(t, r0, r1, buf), _noop
        start = t.offset + r0 * t.row_numel * itemsize(t.dtype)
        with warnings.catch_warnings():  # read-only memory: the view is only ever read
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=start)
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, (start + nbytes) // page * page

        def release() -> None:
            if hi > lo and not mm.closed:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

        return raw.view(DTYPES[t.dtype]).view(shape), release

    def read(self, t: SourceTensor) -> torch.Tensor:
        """The whole tensor, in its own memory."""
        buf = torch.empty(max(t.nbytes, 1), dtype=torch.uint8)
        return self.read_rows(t, 0, t.rows, buf)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a view is still referenced somewhere: the mapping goes with it
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin.clear()
        self._sizes.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsupportedModel(
            f"{path.name} holds pickled Python objects besides tensors; int8 loads .bin files with "
            f"weights_only=True and will not unpickle arbitrary code ({str(e).splitlines()[0]})",
            "If you trust the file, load it with torch.load and save the state dict with safetensors.",
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        msg = str(e)
        if "mmap" in msg:
            raise UnsupportedModel(
                f"{path.name} cannot be memory-mapped: it was saved in PyTorch's legacy (pre-1.6) format",
                "Re-save it with a current torch (torch.save(torch.load(f, weights_only=True), f)) "
                "or convert it to safetensors, then run int8 again.",
            ) from None
        raise CorruptCheckpoint(f"{path} could not be read: {msg.splitlines()[0][:200]}", "Download or save it again.") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state
