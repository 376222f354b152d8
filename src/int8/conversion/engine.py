"""The streaming engine of `int8 convert`: read, quantize and write at once, in flat memory.

Work is cut into units: a row chunk of a tensor (about ``CHUNK_BYTES`` of
source), or the opening or closing of an output shard. Worker threads take
units in plan order, each viewing its chunk in the page cache (or, for small
chunks and the numpy kernel, reading it into a pooled buffer: `Pipeline._read`) and
quantizing it (numba, numpy on large arrays and torch release the GIL, so the
workers run on all cores); a writer thread appends the results to the shards strictly in plan
order, hashing as it goes. A unit holds a permit from the moment a worker
takes it until the writer has written it, so at most ``permits`` chunks are
in memory at once, whatever the model's size, and the writer can always
make progress (the unit it waits for was taken before any later one).
Progress is reported from the calling thread, where Ctrl-C lands.

Data is numpy throughout (`int8.conversion.arrays`): a CPU conversion of a safetensors checkpoint
never imports torch, and a small one not even numba (`arrays.choose_kernel`). torch does the
arithmetic only on a CUDA device and for bitsandbytes' layout (`int8.conversion.torch_ops`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint import CHANGED_HINT, CheckpointReader
from ..errors import BadTensor, SourceChanged
from ..formats import OutputFormat
from ..formats.bitsandbytes import weight_format_bytes
from ..formats.compressed_tensors import packed_columns
from ..formats.safetensors import FLOAT_DTYPES, NUMPY_DTYPES, itemsize
from ..hf import WeightLayout
from ..scheme import ErrorStats, NonFiniteWeights, num_blocks
from . import arrays
from .plan import QUANTIZE, ConversionPlan, ShardPlan, TensorPlan
from .writer import BackgroundHasher, ShardWriter

CHUNK_BYTES = 8 << 20
"""Source bytes per unit on the CPU. Small enough that a chunk's codes are still in cache when the writer copies
and hashes them, and that the buffers in flight stay few and warm (memory touched for the first time is slow
on a VM); large enough that the per-unit Python costs nothing. Against 32 MiB, README's bench/convert machine
streamed a 3.49 GB checkpoint in 1.2 s instead of 1.9 s, at 0.26 GB peak RSS instead of 0.38."""

CUDA_CHUNK_BYTES = 32 << 20
"""Source bytes per unit on a GPU, where each unit costs a host-to-device copy and a few launches
(README's bench/gpu measured the conversion at this size)."""

VIEW_MIN_BYTES = 1 << 20
"""Source chunks from this size are viewed in place rather than copied, when the compiled kernels run: every
numpy operation on them then releases the GIL too (numpy keeps it only below a few hundred values)."""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _Stopped(Exception):
    """Another thread failed or the run was interrupted; this one stops quietly."""


class _BufferPool:
    """Reusable byte buffers: reuse keeps memory flat and avoids page-faulting fresh memory."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> tuple[np.ndarray, Callable[[], None]]:
        """A flat uint8 buffer of at least ``n`` bytes and the function that gives it back (idempotent)."""
        if n > self.nbytes:
            return np.empty(n, np.uint8), _noop
        with self._lock:
            buf = self._free.pop() if self._free else np.empty(self.nbytes, np.uint8)
        given = []

        def release() -> None:
            with self._lock:
                if not given:
                    given.append(True)
                    self._free.append(buf)

        return buf, release


def _noop() -> None:
    pass


@dataclass
class _Unit:
    seq: int
    shard: ShardPlan | None = None  # open this shard (when entry is None)
    close: bool = False  # close the current shard
    entry: TensorPlan | None = None
    r0: int = 0
    r1: int = 0
    outputs: list[tuple[object, Callable[[], None]]] = field(default_factory=list)


def _units(plan: ConversionPlan, chunk_bytes: int) -> Iterator[_Unit]:
    seq = 0
    for shard in plan.shards:
        yield _Unit(seq, shard=shard)
        seq += 1
        for e in shard.entries:
            t = e.source
            if e.action == QUANTIZE and e.layout == WeightLayout.CONV1D:
                ranges = [(0, t.rows)]  # the input dimension is the row dimension: whole tensor
            else:
                step = max(1, chunk_bytes // max(1, t.row_numel * itemsize(t.dtype)))
                ranges = [(r, min(t.rows, r + step)) for r in range(0, t.rows, step)]
            for r0, r1 in ranges:
                yield _Unit(seq, entry=e, r0=r0, r1=r1)
                seq += 1
        yield _Unit(seq, close=True)
        seq += 1


@dataclass(frozen=True)
class StreamResult:
    """What a stream gives: per-tensor error stats, each shard's SHA-256, and the seconds from its start until the
    last shard was written and hashed (work done ``meanwhile`` that ends later is not counted)."""

    stats: dict[str, ErrorStats]
    hashes: dict[str, str]
    seconds: float


class Pipeline:
    """One conversion stream: `run()` returns a `StreamResult`."""

    def __init__(
        self,
        reader: CheckpointReader,
        plan: ConversionPlan,
        folder: Path,
        device: str,
        workers: int,
        chunk_bytes: int = CHUNK_BYTES,
        kernel: arrays.Kernel | None = None,
    ):
        self.reader, self.plan, self.folder, self.device = reader, plan, folder, device
        self.n_workers = max(1, workers)
        self.chunk_bytes = chunk_bytes
        self.pool = _BufferPool(chunk_bytes)
        self.stop = threading.Event()
        self.failures: list[BaseException] = []
        self.stats: dict[str, ErrorStats] = {}
        self.scales: dict[str, np.ndarray] = {}
        self.kernel = arrays.Kernel(kernel) if kernel else arrays.choose_kernel(sum(e.source.nbytes for e in plan.quantized))
        # torch does the arithmetic on a GPU and for bitsandbytes' layout (`int8.conversion.torch_ops`)
        self.torch_ops = None
        if device != "cpu" or plan.format == OutputFormat.BNB or self.kernel == arrays.Kernel.TORCH:
            from . import torch_ops

            self.torch_ops = torch_ops
        self.hashes: dict[str, str] = {}
        self._lock = threading.Lock()
        self._units = _units(plan, chunk_bytes)
        self._started = self._seconds = 0.0
        self._permits = threading.Semaphore(2 * self.n_workers + 2)
        self._done: queue.Queue[_Unit | None] = queue.Queue()
        self._progress: queue.Queue[tuple[int, int] | None] = queue.Queue()

    # -- the calling thread ------------------------------------------------------------------

    def run(self, progress, meanwhile: Callable[[], None] | None = None) -> StreamResult:
        """Stream everything; ``meanwhile`` runs on this thread once the workers have started (see `stream`)."""
        self._started = time.perf_counter()
        progress.start(sum(e.source.nbytes for s in self.plan.shards for e in s.entries), len(self.plan.written))
        threads = [threading.Thread(target=self._work, name=f"int8-worker-{i}", daemon=True) for i in range(self.n_workers)]
        threads.append(threading.Thread(target=self._write, name="int8-writer", daemon=True))
        try:
            with _sigbus_guard(self):
                try:
                    for th in threads:
                        th.start()
                    if meanwhile is not None:
                        meanwhile()  # if it raises, `finally` stops the workers
                    self._loop(threads, progress)
                finally:
                    self.stop.set()
                    _join([th for th in threads if th.ident is not None], 30.0)
        finally:
            progress.finish()
        if self.failures:
            changed = self.reader.changed_file()
            if changed is not None and not isinstance(self.failures[0], SourceChanged):
                raise _changed(changed) from None
            raise self.failures[0]
        return StreamResult(self.stats, self.hashes, self._seconds)

    def _loop(self, threads: list[threading.Thread], progress) -> None:
        try:
            while True:
                try:
                    item = self._progress.get(timeout=0.1)
                except queue.Empty:
                    if not threads[-1].is_alive() and self._progress.empty():
                        break
                    continue
                if item is None:  # the writer is done (it says so rather than let this wait out a timeout)
                    break
                progress.advance(*item)
        except BaseException:
            self.stop.set()
            raise

    def source_truncated(self) -> None:
        """A source file shrank under its mapping (SIGBUS): zero-fill the mappings so the faulting
        thread goes on, and fail the run, naming the file."""
        self.reader.zero_mappings()
        if not any(isinstance(f, SourceChanged) for f in self.failures):
            changed = self.reader.changed_file()
            self._fail(_changed(changed) if changed is not None else SourceChanged(
                "a source file was truncated while int8 was reading it", CHANGED_HINT))

    # -- workers -----------------------------------------------------------------------------

    def _take(self) -> _Unit | None:
        while not self._permits.acquire(timeout=0.1):
            if self.stop.is_set():
                raise _Stopped
        with self._lock:  # permits and units are handed out in the same order
            unit = next(self._units, None)
        if unit is None:
            self._permits.release()
        return unit

    def _work(self) -> None:
        try:
            while not self.stop.is_set():
                unit = self._take()
                if unit is None:
                    self._done.put(None)
                    return
                if unit.entry is not None:
                    self._process(unit)
                self._done.put(unit)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the calling thread
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self.failures.append(exc)
        self.stop.set()

    def _process(self, u: _Unit) -> None:
        e = u.entry
        t = e.source
        data, release_in = self._read(t, u.r0, u.r1)
        try:
            if e.action == QUANTIZE:
                self._quantize(u, data)
                release_in()
            else:
                self._keep(u, data, release_in)
        except BaseException:
            release_in()
            for _, release in u.outputs:
                release()
            u.outputs.clear()
            raise
        self._progress.put((data.nbytes, int(u.r1 == t.rows)))

    def _read(self, t, r0: int, r1: int) -> tuple[np.ndarray, Callable[[], None]]:
        """Rows ``[r0, r1)`` of a source tensor and the function that releases them.

        A large chunk for the compiled kernels is a view of the page cache (no copy). Anything else is read into
        a buffer of the pool (``pread``): code that holds the GIL (numpy on small arrays) must never touch a
        mapping, because a file truncated under it faults with SIGBUS, and a thread that holds the GIL while
        it faults never lets the handler run (`_sigbus_guard`)."""
        nbytes = (r1 - r0) * t.row_numel * itemsize(t.dtype)
        if self.kernel == arrays.Kernel.NUMBA and nbytes >= VIEW_MIN_BYTES:
            return self.reader.view_array(t, r0, r1)
        buf, release = self.pool.take(max(nbytes, 1))
        try:
            return self.reader.read_rows_array(t, r0, r1, buf), release
        except BaseException:
            release()
            raise

    def _quantize(self, u: _Unit, data: np.ndarray) -> None:
        """One row chunk of a quantized weight: its codes now, its scales (and the shape or format tensor)
        with the tensor's last chunk. compressed-tensors' layout: code + 128 packed four to an int32,
        rows padded with zero bytes, scales per block; bitsandbytes': int8 codes as they are, one
        float32 SCB per row (`int8.rowwise`)."""
        e = u.entry
        out_f, in_f = e.out_features, e.in_features
        bnb = self.plan.format == OutputFormat.BNB
        conv1d = e.layout == WeightLayout.CONV1D  # the input dimension is the row dimension: the whole tensor at once
        rows = out_f if conv1d else u.r1 - u.r0
        r0, r1 = (0, out_f) if conv1d else (u.r0, u.r1)
        width = in_f if bnb else packed_columns(in_f) * 4
        with self._lock:
            if e.name not in self.scales:
                self.scales[e.name] = (np.empty(out_f, np.float32) if bnb else
                                       np.empty((out_f, num_blocks(in_f, e.block_size)), NUMPY_DTYPES[e.out_dtype]))
            scales = self.scales[e.name]
        buf, release_out = self.pool.take(rows * width)
        u.outputs.append((None, release_out))  # released on failure; replaced below
        codes = buf[: rows * width].reshape(rows, width)
        if width > in_f:
            codes[:, in_f:] = 0
        try:
            if bnb:
                st = self.torch_ops.quantize_rows(data, e.source.dtype, codes, scales[r0:r1], device=self.device,
                                                  transposed=conv1d)
            elif self.torch_ops is not None:
                st = self.torch_ops.quantize_blocks(data, e.source.dtype, e.block_size, codes, scales[r0:r1], e.out_dtype,
                                                    device=self.device, transposed=conv1d)
            else:
                st = arrays.quantize_blocks(data, e.source.dtype, e.block_size, codes, scales[r0:r1], e.out_dtype,
                                            transposed=conv1d, kernel=self.kernel)
        except NonFiniteWeights as err:
            raise BadTensor(
                f"tensor {e.source.name!r} in {e.source.file.name} contains {err}: the int8 output would be garbage",
                "The source checkpoint is damaged or was saved from a diverged model; fix or re-download it.",
            ) from None
        with self._lock:
            self.stats.setdefault(e.name, ErrorStats()).merge(st)
        u.outputs[-1] = (codes, release_out)
        if u.r1 == e.source.rows:
            # Written after every earlier unit of this tensor, hence after all its rows are done.
            u.outputs.append((scales, _noop))
            tail = weight_format_bytes() if bnb else np.array([out_f, in_f], dtype=np.int64)
            u.outputs.append((tail, _noop))

    def _keep(self, u: _Unit, x: np.ndarray, release_in: Callable[[], None]) -> None:
        e = u.entry
        src, is_float = e.source.dtype, e.source.dtype in FLOAT_DTYPES
        if e.out_dtype == src:
            if is_float and not arrays.all_finite(x, src):
                raise _not_finite(e)
            u.outputs.append((x, release_in))
            return
        buf, release_out = self.pool.take(x.size * itemsize(e.out_dtype))
        u.outputs.append((None, release_out))
        y = arrays.cast_finite(x, src, e.out_dtype, buf) if is_float else arrays.cast_into(x, src, e.out_dtype, buf)
        if y is None:
            raise _not_finite(e)
        release_in()
        if e.out_dtype == "F16" and not arrays.all_finite(y, "F16"):
            raise BadTensor(
                f"tensor {e.source.name!r} has values beyond float16's range (|x| > 65504)",
                "Convert with --dtype bf16 (same range as fp32) instead.",
            )
        u.outputs[-1] = (y, release_out)

    # -- the writer --------------------------------------------------------------------------

    def _write(self) -> None:
        pending: dict[int, _Unit] = {}
        expected = 0
        finished_workers = 0
        writer: ShardWriter | None = None
        hasher = BackgroundHasher()
        try:
            while finished_workers < self.n_workers or pending:
                try:
                    unit = self._done.get(timeout=0.1)
                except queue.Empty:
                    if self.stop.is_set():
                        raise _Stopped from None
                    continue
                if unit is None:
                    finished_workers += 1
                    continue
                pending[unit.seq] = unit
                while expected in pending:
                    u = pending.pop(expected)
                    expected += 1
                    if u.shard is not None and u.entry is None:
                        outputs = [o for e in u.shard.entries for o in e.outputs]
                        writer = ShardWriter(self.folder / u.shard.filename, outputs, {"format": "pt"}, hasher)
                    elif u.close:
                        self.hashes[writer.path.name] = writer.close()
                        writer = None
                    else:
                        for data, release in u.outputs:  # a buffer goes back to its pool once written and hashed
                            writer.write(data, after=release)
                        if u.entry.action == QUANTIZE and u.r1 == u.entry.source.rows:
                            with self._lock:
                                self.scales.pop(u.entry.name, None)
                    self._permits.release()
            self._seconds = time.perf_counter() - self._started  # the last shard is written and hashed
        except _Stopped:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            if writer is not None:  # a shard left open: the run failed or was interrupted
                writer.abort()
            hasher.close()
            for u in pending.values():
                for _, release in u.outputs:
                    release()
            self._progress.put(None)


def _not_finite(e: TensorPlan) -> BadTensor:
    return BadTensor(
        f"tensor {e.source.name!r} in {e.source.file.name} contains NaN or Inf values: the output would be garbage",
        "The source checkpoint is damaged or was saved from a diverged model; fix or re-download it.",
    )


def _changed(path: Path) -> SourceChanged:
    return SourceChanged(f"{path.name} was truncated while int8 was reading it", CHANGED_HINT)


def _join(threads: list[threading.Thread], timeout: float) -> None:
    """Join with short waits, so the main thread keeps running signal handlers meanwhile."""
    deadline = time.monotonic() + timeout
    for th in threads:
        while th.is_alive() and time.monotonic() < deadline:
            th.join(timeout=0.05)


@contextlib.contextmanager
def _sigbus_guard(pipeline: Pipeline) -> Iterator[None]:
    """While the pipeline streams, a SIGBUS (a source file truncated under its mapping: a page past
    the new end faults) fails the run with a message instead of killing the process.

    The fault happens in a worker thread, with the GIL released (torch, numba, hashlib); CPython's
    handler notes the signal and returns, the thread faults again on the same page, and the main
    thread, which polls every 0.1 s, runs `Pipeline.source_truncated`: it puts zero pages where the
    mappings were, so the faulting thread goes on, and marks the run failed. Only the main thread
    can install a handler; elsewhere a truncation still kills the process, as before."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGBUS"):
        yield
        return

    handled = False

    def handler(signum, frame) -> None:
        # The faulting thread keeps faulting until the mappings are replaced, so more SIGBUS arrive
        # while this runs (CPython runs handlers between bytecodes, even inside a handler): handle
        # the first only. `source_truncated` replaces every mapping at once, so one is enough.
        nonlocal handled
        if handled:
            return
        handled = True
        pipeline.source_truncated()

    previous = signal.signal(signal.SIGBUS, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGBUS, previous)


def stream(
    reader: CheckpointReader,
    plan: ConversionPlan,
    folder: Path,
    device: str,
    progress,
    chunk_bytes: int | None = None,
    kernel: arrays.Kernel | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> StreamResult:
    """Read, quantize and write every planned tensor on ``device`` ("cpu", "cuda", "cuda:N"); return error
    stats, shard hashes and the stream's own time. ``chunk_bytes`` defaults to `CHUNK_BYTES` on the CPU, `CUDA_CHUNK_BYTES` on a GPU;
    ``kernel`` forces a CPU implementation (default: `arrays.choose_kernel`).

    ``meanwhile`` is work that does not need the stream's results (imports, side files), run on the calling
    thread while the workers stream: the stream's threads spend most of their time outside the GIL, so it
    costs them little. If it raises, the stream stops and the exception propagates."""
    workers = cpu_count() if device == "cpu" else 1
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES if device == "cpu" else CUDA_CHUNK_BYTES
    pipeline = Pipeline(reader, plan, folder, device, workers, chunk_bytes, kernel)
    if pipeline.torch_ops is None:
        return pipeline.run(progress, meanwhile)
    with pipeline.torch_ops.single_threaded():
        return pipeline.run(progress, meanwhile)
