"""The data pass of the structure checks: each shard read once, hashed and checked on the way.

The file is read front to back in chunks (header, tensor data and any gap
between them); each chunk is hashed on a helper thread (hashlib releases the
GIL) while the calling thread checks the tensor it belongs to: packed codes
hold no byte 0 (code -128), scales are finite and non-negative, other floating
tensors hold no NaN or Inf. The value checks work on the raw bit patterns with
numpy integer reductions (one SIMD pass, one thread, any float dtype), so the
SHA-256 (about 1.4 GB/s per core) is the limit. Shards are scanned in
parallel, one thread each, up to one per core.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..formats.safetensors import DTYPES, FLOAT_DTYPES
from ..paths import plain, show
from ..scheme import QMAX
from .layout import Layout, QuantLayer, StoredTensor

CHUNK_BYTES = 16 << 20

@dataclass
class ShardScan:
    """What one shard's data pass found."""

    sha256: str = ""
    bytes: int = 0
    codes: list[str] = field(default_factory=list)
    scales: list[str] = field(default_factory=list)
    finite: list[str] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    n_codes: int = 0
    n_scales: int = 0
    n_float: int = 0
    scale_min: float = math.inf
    scale_max: float = -math.inf
    error: str | None = None


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


class _Hasher:
    """SHA-256 of a file on a helper thread: hashlib releases the GIL, so it overlaps the checks."""

    def __init__(self, buffers: int, nbytes: int):
        self.sha = hashlib.sha256()
        self._free: queue.Queue = queue.Queue()
        for _ in range(buffers):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8))
        self._todo: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            buf, n = item
            self.sha.update(memoryview(buf.numpy())[:n])
            self._free.put(buf)

    def take(self) -> torch.Tensor:
        return self._free.get()

    def give(self, buf: torch.Tensor, n: int) -> None:
        self._todo.put((buf, n))

    def finish(self) -> str:
        self._todo.put(None)
        self._thread.join()
        return self.sha.hexdigest()


def _scan_shard(path: Path, tensors: list[StoredTensor], layers: dict[str, QuantLayer], chunk: int = CHUNK_BYTES) -> ShardScan:
    """Hash ``path`` end to end and check each tensor's values on the way."""
    scan = ShardScan()
    by_packed = {q.packed.name: q for q in layers.values()}
    scale_names = {q.scale.name for q in layers.values()}
    hasher = _Hasher(3, chunk)
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            pos = 0

            def read(n: int) -> tuple[torch.Tensor, int]:
                nonlocal pos
                buf = hasher.take()
                mv = memoryview(buf.numpy())[:n]
                got = 0
                while got < n:
                    k = f.readinto(mv[got:])
                    if not k:
                        break
                    got += k
                pos += got
                return buf, got

            def skip_to(end: int) -> None:
                while pos < end:
                    buf, got = read(min(chunk, end - pos))
                    hasher.give(buf, got)
                    if not got:
                        return

            for t in tensors:
                if t.start < pos or t.end > size:
                    continue  # overlapping or truncated: the index check reports it
                skip_to(t.start)
                if t.nbytes == 0:
                    continue
                rows_per = max(1, chunk // max(1, t.row_bytes))
                if t.row_bytes > chunk:
                    rows_per = 0
                r = 0
                while r < t.rows:
                    if rows_per == 0:  # a single row larger than a chunk: checked in pieces of elements
                        n = min(chunk, t.end - pos)
                        r0, r1 = r, r
                    else:
                        r0, r1 = r, min(t.rows, r + rows_per)
                        n = (r1 - r0) * t.row_bytes
                    start = pos
                    buf, got = read(n)
                    if got < n:
                        hasher.give(buf, got)
                        scan.error = f"{path.name} ended while reading tensor {show(t.name)}"
                        break
                    try:
                        _check_chunk(scan, t, buf[:n], r0, r1, start, by_packed, scale_names)
                    finally:
                        hasher.give(buf, got)
                    if rows_per == 0:
                        if pos >= t.end:
                            r = t.rows
                    else:
                        r = r1
            skip_to(size)
            scan.bytes = pos
    finally:
        scan.sha256 = hasher.finish()
    return scan


def _check_chunk(
    scan: ShardScan,
    t: StoredTensor,
    data: torch.Tensor,
    r0: int,
    r1: int,
    offset: int,
    by_packed: dict[str, QuantLayer],
    scale_names: set[str],
) -> None:
    where = f"{t.file.name}: {plain(t.name)}"
    if t.name in by_packed:
        q = by_packed[t.name]
        if r1 == r0:  # piecewise: treat as a flat run of bytes of one row
            return _check_codes_flat(scan, t, data, offset, q.in_features)
        raw = data.view(r1 - r0, -1)[:, : q.in_features]
        scan.n_codes += raw.numel()
        if int(raw.numpy().min()) == 0:  # packed byte 0 is code -128 (numpy: one SIMD pass, one thread)
            bad = raw == 0
            r, c = _first(bad)
            scan.codes.append(
                f"{where} holds {int(bad.sum())} code(s) of -128 (first at row {r0 + r}, column {c}); "
                f"codes must lie in [-{QMAX}, {QMAX}]"
            )
        return
    if t.dtype == "I64" and t.name.endswith(".weight_shape"):
        if data.numel() > 8 * 8:  # a shape has two values; the structure check reports the wrong size
            return
        scan.shapes[t.name] = data.view(torch.int64).tolist()
        return
    if t.dtype not in FLOAT_DTYPES:
        return
    x = data.view(DTYPES[t.dtype])
    nonfinite, negative = _float_flags(data, t.dtype)
    is_scale = t.name in scale_names or t.name.endswith(".weight_scale")
    cols = max(1, x.numel() // max(1, r1 - r0)) if r1 > r0 else x.numel()
    if is_scale:
        scan.n_scales += x.numel()
        if not nonfinite and not negative and x.numel():
            # non-negative floats sort like their bit patterns: the range costs two integer reductions
            kind = _BITS[t.dtype][0]
            u = data.numpy().view(kind)
            lo, hi = torch.from_numpy(np.array([u.min(), u.max()], dtype=kind)).view(DTYPES[t.dtype]).tolist()
            scan.scale_min = min(scan.scale_min, lo)
            scan.scale_max = max(scan.scale_max, hi)
        if nonfinite or negative:
            nan, inf, neg = torch.isnan(x), torch.isinf(x), x < 0
            for what, mask in (("NaN", nan), ("infinite", inf), ("negative", neg & ~inf)):
                if bool(mask.any()):
                    i = _first(mask)[0]
                    scan.scales.append(
                        f"{where} has {int(mask.sum())} {what} scale(s) (first at row {r0 + i // cols}, block {i % cols})"
                    )
        return
    scan.n_float += x.numel()
    if nonfinite:
        bad = ~torch.isfinite(x)
        i = _first(bad)[0]
        shape = f"row {r0 + i // cols}, column {i % cols}" if len(t.shape) > 1 else f"index {r0 + i}"
        scan.finite.append(f"{where} holds {int(bad.sum())} NaN or infinite value(s) (first at {shape})")


_BITS = {  # (unsigned view, exponent mask, sign bit) of each float dtype's bit pattern
    "F16": (np.uint16, 0x7C00, 0x8000),
    "BF16": (np.uint16, 0x7F80, 0x8000),
    "F32": (np.uint32, 0x7F800000, 0x80000000),
    "F64": (np.uint64, 0x7FF0000000000000, 0x8000000000000000),
}


def _float_flags(data: torch.Tensor, dtype: str) -> tuple[bool, bool]:
    """(any NaN or Inf, any value below zero) of raw float bytes, from the bit patterns.

    NaN and Inf are the values whose exponent bits are all ones; a negative value
    has the sign bit set and is not -0.0, so its pattern exceeds the sign bit
    alone. Integer reductions in numpy run at memory speed on one thread for
    every float dtype (bf16 included), where float reductions do not."""
    kind, exp_mask, sign = _BITS[dtype]
    u = data.numpy().view(kind)
    if not u.size:
        return False, False
    nonfinite = int(np.bitwise_and(u, kind(exp_mask)).max()) == exp_mask
    negative = int(u.max()) > sign
    return nonfinite, negative


def _check_codes_flat(scan: ShardScan, t: StoredTensor, data: torch.Tensor, offset: int, in_features: int) -> None:
    """Codes of a row longer than a chunk (rows of over 16 MB: not in any real model, handled anyway)."""
    row_bytes = t.row_bytes
    rel = offset - t.start
    cols = (torch.arange(data.numel(), dtype=torch.int64) + rel) % row_bytes
    inside = cols < in_features
    bad = (data == 0) & inside
    scan.n_codes += int(inside.sum())
    if bool(bad.any()):
        i = _first(bad)[0]
        scan.codes.append(
            f"{t.file.name}: {plain(t.name)} holds {int(bad.sum())} code(s) of -128 "
            f"(first at row {(rel + i) // row_bytes}, column {(rel + i) % row_bytes}); codes must lie in [-{QMAX}, {QMAX}]"
        )


def scan_all(shards: list[Path], layout: Layout, workers: int | None) -> dict[Path, ShardScan]:
    by_file: dict[Path, list[StoredTensor]] = {p: [] for p in shards}
    for t in layout.tensors.values():
        by_file.setdefault(t.file, []).append(t)
    for ts in by_file.values():
        ts.sort(key=lambda t: t.start)
    n = max(1, min(len(by_file), workers or os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="int8-verify-scan") as pool:
        futures = {p: pool.submit(_scan_shard, p, ts, layout.quantized) for p, ts in by_file.items()}
        return {p: f.result() for p, f in futures.items()}
