"""Read source checkpoints tensor by tensor, row range by row range, in flat memory.

`find_checkpoint` locates a folder's weights (one format, every file inside the folder:
`int8.paths`); `CheckpointReader` serves their tensors to the converter and to verify:

* safetensors (single or sharded): headers come from `int8.formats.safetensors` (validated
  there); each file is mapped read-only and row ranges are viewed in place (no copy) or read with
  ``pread`` into the caller's buffer; after a range is used its pages are dropped from the process
  with ``madvise``, so the resident set stays flat even for a 24 GB model. Sizes are checked
  against the headers before mapping and before each read, and a file truncated under the mapping
  fails the run cleanly (`int8.errors.SourceChanged`) instead of killing it.
* PyTorch ``pytorch_model.bin`` (single or sharded): loaded by `int8.formats.pytorch`
  (memory-mapped, ``weights_only=True``: no pickled code runs), pages dropped the same way.

Data comes out as numpy arrays (`view_array`, `read_rows_array`: bfloat16 as its raw ``uint16``
bits, `int8.formats.safetensors.NUMPY_DTYPES`), which is what the CPU converter works on without
importing torch, or as torch tensors over the same memory (`view_rows`, `read_rows`, `read`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import CorruptCheckpoint, NoWeightsFound, ResourceLimit, SourceChanged, UnsupportedModel
from .formats.pytorch import BIN_INDEX, BIN_SINGLE, load_bin
from .formats.safetensors import (
    MAX_TENSORS,
    NUMPY_DTYPES,
    SAFE_INDEX,
    SAFE_SINGLE,
    SourceTensor,
    index_files,
    itemsize,
    read_index,
    read_safetensors_header,
    to_numpy,
    to_torch,
)
from .paths import inside, plain, show

if TYPE_CHECKING:
    import torch

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










# --------------------------------------------------------------------------- safetensors headers












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
        import torch

        from .formats.safetensors import DTYPE_NAMES

        found: dict[str, Path] = {}
        for path in self.files.files:
            state = load_bin(path)
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
                ranges.append((np.frombuffer(mm, dtype=np.uint8).ctypes.data, len(mm)))
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

    def read_rows_array(self, t: SourceTensor, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
        """Copy rows ``[r0, r1)`` of ``t`` into ``out`` (a flat uint8 array); return them as an array over it."""
        count = (r1 - r0) * t.row_numel
        nbytes = count * itemsize(t.dtype)
        view = out[:nbytes]
        self._check_size(t.file)
        if t.name in self._bin:
            import torch

            src = self._bin[t.name]
            flat = src.reshape(-1) if src.is_contiguous() else src.contiguous().reshape(-1)
            part = flat[r0 * t.row_numel : r0 * t.row_numel + count]
            # torch's copy, not numpy's: it runs without the GIL, so a source truncated under the mapping
            # (SIGBUS) reaches the handler on the main thread (`engine._sigbus_guard`); numpy holds the GIL
            # for small copies, and a thread that faults while holding it hangs the process.
            if nbytes:
                torch.from_numpy(view).copy_(part.view(torch.uint8))
            if src.is_contiguous():
                _madvise_dontneed(part.data_ptr(), nbytes)
        else:
            fd = self._fds[t.file]
            mv = memoryview(view)
            pos = t.offset + r0 * t.row_numel * itemsize(t.dtype)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [mv[done:]], pos + done)
                if got <= 0:
                    raise SourceChanged(f"{t.file.name} ended while int8 was reading tensor {show(t.name)}: it was truncated",
                                        CHANGED_HINT)
                done += got
        return view.view(NUMPY_DTYPES[t.dtype]).reshape(_rows_shape(t, r0, r1))

    def view_array(self, t: SourceTensor, r0: int, r1: int) -> tuple[np.ndarray, Callable[[], None]]:
        """Rows ``[r0, r1)`` of ``t`` without copying: a read-only view of the page cache through the file's
        mapping, and the function that drops those pages from this process once the view is no longer
        used (the data stays in the page cache; the resident set stays flat)."""
        count = (r1 - r0) * t.row_numel
        nbytes = count * itemsize(t.dtype)
        shape = _rows_shape(t, r0, r1)
        self._check_size(t.file)
        if t.name in self._bin:
            src = self._bin[t.name]
            if not src.is_contiguous():
                return self.read_rows_array(t, r0, r1, np.empty(max(nbytes, 1), np.uint8)), _noop
            part = src.reshape(-1)[r0 * t.row_numel : r0 * t.row_numel + count]
            return to_numpy(part).reshape(shape), lambda: _madvise_dontneed(part.data_ptr(), nbytes)
        mm = self._maps.get(t.file)
        if mm is None or nbytes == 0:
            return self.read_rows_array(t, r0, r1, np.empty(max(nbytes, 1), np.uint8)), _noop
        start = t.offset + r0 * t.row_numel * itemsize(t.dtype)
        raw = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=start)
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, (start + nbytes) // page * page

        def release() -> None:
            if hi > lo and not mm.closed:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

        return raw.view(NUMPY_DTYPES[t.dtype]).reshape(shape), release

    def read_rows(self, t: SourceTensor, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """`read_rows_array` into ``out`` (a flat uint8 tensor), as a tensor of ``t``'s dtype."""
        return to_torch(self.read_rows_array(t, r0, r1, out.numpy()), t.dtype)

    def view_rows(self, t: SourceTensor, r0: int, r1: int) -> tuple[torch.Tensor, Callable[[], None]]:
        """`view_array` as a tensor of ``t``'s dtype over the same memory. Never write to it."""
        arr, release = self.view_array(t, r0, r1)
        return to_torch(arr, t.dtype), release

    def read(self, t: SourceTensor) -> torch.Tensor:
        """The whole tensor, in its own memory."""
        import torch

        return self.read_rows(t, 0, t.rows, torch.empty(max(t.nbytes, 1), dtype=torch.uint8))

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




def _rows_shape(t: SourceTensor, r0: int, r1: int) -> tuple[int, ...]:
    return (r1 - r0, *t.shape[1:]) if t.shape else ()

