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
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptCheckpoint, NoWeightsFound, UnsupportedModel

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

_MAX_HEADER = 100 * 1024 * 1024


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


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
    """Locate the weights in ``folder``: safetensors when present, else ``.bin``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NoWeightsFound(f"{folder} is not a folder")
    for index_name, single, fmt in ((SAFE_INDEX, SAFE_SINGLE, "safetensors"), (BIN_INDEX, BIN_SINGLE, "pytorch")):
        index = folder / index_name
        if index.is_file():
            files = _index_files(index)
            return CheckpointFiles(fmt, files, index)
        if (folder / single).is_file():
            return CheckpointFiles(fmt, (folder / single,), None)
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


def _index_files(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{index} is not a valid shard index ({e})") from None
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise CorruptCheckpoint(
            f"{index.name} lists shards that are missing from {index.parent}: {', '.join(missing[:5])}",
            "Download the checkpoint again (a Hub download resumes where it stopped).",
        )
    return tuple(index.parent / n for n in names)


def scan_safetensors_header(path: Path) -> tuple[list[SourceTensor], int, list[str]]:
    """Parse a safetensors header, collecting every problem instead of stopping at the first.

    Returns the tensors sorted by offset (``offset`` absolute in the file), the
    byte where the data starts, and the problems (none for a sound file): a
    header that cannot be read, malformed or overlapping entries, unknown
    dtypes, and tensors cut off by truncation (the first one named).
    """
    size = path.stat().st_size
    name = path.name
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return [], 0, [f"{name} is truncated to {size} bytes: not even a safetensors header"]
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or n > size - 8:
            return [], 0, [f"{name} has a header length of {n} bytes but the file holds {size}: truncated or corrupt"]
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        return [], 0, [f"{name} has a corrupt safetensors header ({e})"]
    start = 8 + n
    problems: list[str] = []
    tensors: list[SourceTensor] = []
    for tname, info in header.items():
        if tname == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: tensor {tname!r} has a malformed header entry {info!r}")
            continue
        if dtype not in DTYPES:
            problems.append(f"{name}: tensor {tname!r} has dtype {dtype}, which int8 does not read")
            continue
        if b < 0 or e - b != math.prod(shape) * itemsize(dtype):
            problems.append(f"{name}: tensor {tname!r} has offsets {b}..{e}, which do not fit {dtype} {list(shape)}")
            continue
        tensors.append(SourceTensor(tname, dtype, shape, path, start + b))
    tensors.sort(key=lambda t: t.offset)
    for a, b in itertools.pairwise(tensors):
        if b.offset < a.offset + a.nbytes:
            problems.append(f"{name}: tensors {a.name!r} and {b.name!r} overlap in the file")
    cut = [t for t in tensors if t.offset + t.nbytes > size]
    if cut:
        problems.append(
            f"{name} is truncated: {size} bytes, but tensor {cut[0].name!r} ends at byte {cut[0].offset + cut[0].nbytes}"
            + (f" ({len(cut) - 1} more tensor(s) after it are cut off too)" if len(cut) > 1 else "")
        )
    return tensors, start, problems


def read_safetensors_header(path: Path) -> list[SourceTensor]:
    """The tensors of a sound safetensors file, sorted by offset; `CorruptCheckpoint` otherwise."""
    tensors, _, problems = scan_safetensors_header(path)
    if problems:
        raise CorruptCheckpoint(f"{path}: {problems[0]}", "Download or save the checkpoint again.")
    return tensors


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
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _libc = None


class CheckpointReader:
    """All tensors of a checkpoint, readable by row ranges into caller buffers."""

    def __init__(self, files: CheckpointFiles):
        self.files = files
        self.tensors: list[SourceTensor] = []
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._bin: dict[str, torch.Tensor] = {}
        index_map = self._index_map()
        if files.format == "safetensors":
            self._open_safetensors(index_map)
        else:
            self._open_bin(index_map)

    def _index_map(self) -> dict[str, str] | None:
        if self.files.index is None:
            return None
        return json.loads(self.files.index.read_text())["weight_map"]

    def _check_index(self, index_map: dict[str, str] | None, found: dict[str, Path]) -> None:
        if index_map is None:
            return
        for name, fname in index_map.items():
            if found.get(name) is None or found[name].name != fname:
                raise CorruptCheckpoint(
                    f"{self.files.index.name} says tensor {name!r} is in {fname}, but it is not there",
                    "The shards and their index disagree: download or save the checkpoint again.",
                )

    def _open_safetensors(self, index_map: dict[str, str] | None) -> None:
        found: dict[str, Path] = {}
        for path in self.files.files:
            for t in read_safetensors_header(path):
                found[t.name] = path
                self.tensors.append(t)
            self._fds[path] = os.open(path, os.O_RDONLY)
            if os.fstat(self._fds[path]).st_size:
                mm = mmap.mmap(self._fds[path], 0, access=mmap.ACCESS_READ)
                mm.madvise(mmap.MADV_SEQUENTIAL)
                self._maps[path] = mm
        self._check_index(index_map, found)

    def _open_bin(self, index_map: dict[str, str] | None) -> None:
        found: dict[str, Path] = {}
        for path in self.files.files:
            state = _load_bin(path)
            for name, t in state.items():
                if not isinstance(t, torch.Tensor):
                    raise CorruptCheckpoint(f"{path.name}: entry {name!r} is a {type(t).__name__}, not a tensor")
                if t.dtype not in DTYPE_NAMES:
                    raise UnsupportedModel(f"{path.name}: tensor {name!r} has dtype {t.dtype}, which int8 does not convert")
                found[name] = path
                self._bin[name] = t
                self.tensors.append(SourceTensor(name, DTYPE_NAMES[t.dtype], tuple(t.shape), path))
        self._check_index(index_map, found)

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
                    raise CorruptCheckpoint(f"{t.file} ended while reading tensor {t.name!r}: the file is truncated")
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
        raise CorruptCheckpoint(f"{path} could not be read: {msg.splitlines()[0]}", "Download or save it again.") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state
