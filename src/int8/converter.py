"""`int8 convert`: stream an FP32/FP16/BF16 checkpoint into an int8 checkpoint.

The pipeline has three stages running at once, each on its own thread:

    read (pread / mmap row chunks)  ->  quantize (torch, CPU or CUDA)  ->  write (append + SHA-256)

Tensors are cut into row chunks of ``CHUNK_BYTES``; buffers come from small
fixed pools, so memory stays flat whatever the model's size (about
``1 GB + 2 x the largest tensor`` is the budget, a few hundred MB in
practice). The output is built in a hidden folder beside the target and
renamed into place only when everything has been written: an interrupted or
failed run leaves nothing that looks like a finished conversion.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from . import __version__
from .checkpoint import DTYPES, FLOAT_DTYPES, CheckpointFiles, CheckpointReader, find_checkpoint, itemsize
from .errors import BadTensor, CorruptCheckpoint, Int8Error, OutputError, OutputExists, UnsupportedModel
from .plan import (
    DROP,
    KEEP,
    QUANTIZE,
    TORCH_NAMES,
    ConversionPlan,
    ShardPlan,
    TensorPlan,
    make_plan,
    parse_dtype,
    parse_size,
)
from .quantize import ErrorStats, NonFiniteWeights, num_blocks, packed_columns, quantize_into
from .report import (
    REPORT_NAME,
    ConversionReport,
    FileEntry,
    ModelInfo,
    QuantizationInfo,
    SourceInfo,
    TensorReport,
    Totals,
)
from .sources import ResolvedSource, resolve_source
from .writer import ShardWriter, sha256_file

CHUNK_BYTES = 32 << 20
INDEX_NAME = "model.safetensors.index.json"
CARD_NAME = "README.md"
SIDECAR_GLOBS = (
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
"""Files copied unchanged from the source folder (config.json is rewritten, README.md replaced)."""


class Progress(Protocol):
    """What the converter reports while it works (the CLI draws it with rich)."""

    def start(self, total_bytes: int, total_tensors: int) -> None: ...
    def advance(self, nbytes: int, tensors: int = 0) -> None: ...
    def finish(self) -> None: ...


class _NoProgress:
    def start(self, total_bytes: int, total_tensors: int) -> None:
        pass

    def advance(self, nbytes: int, tensors: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when there is a GPU; 'cpu', 'cuda', 'cuda:1' are taken as said."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UnsupportedModel(f"unknown device {device!r}", "Use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedModel(f"--device {device}: no CUDA GPU is available", "Use --device cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UnsupportedModel(f"--device {device}: there are only {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise UnsupportedModel(f"--device {device}: int8 quantizes on cpu or cuda")
    return dev


def default_output(source: str | Path) -> Path:
    """./NAME-int8, NAME being the preset, the repo's name or the folder's name."""
    return Path.cwd() / f"{Path(str(source).rstrip('/')).name}-int8"


def convert(
    source: str | Path,
    out: str | Path | None = None,
    *,
    block_size: int | None = None,
    dtype: str | None = None,
    device: str = "auto",
    skip: Sequence[str] = (),
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    token: str | bool | None = None,
    progress: Progress | None = None,
    quiet: bool = True,
) -> ConversionReport:
    """Convert a checkpoint to int8; return the report (also saved in the output folder).

    ``source`` is a preset name (see `int8.presets`), a local folder or a Hub
    repo id. ``out`` defaults to ``./<name>-int8``. Raises `int8.errors.Int8Error`
    subclasses for every problem with the input or output.
    """
    progress = progress or _NoProgress()
    # Everything the user typed is checked before anything is downloaded.
    dev = resolve_device(device)
    if dtype is not None:
        parse_dtype(dtype)
    if block_size is not None and block_size < 1:
        raise UnsupportedModel(f"--block-size must be a positive integer, got {block_size}")
    shard_bytes = parse_size(max_shard_size)
    out_dir = Path(out) if out is not None else default_output(source)
    _check_output(out_dir, overwrite)

    resolved = resolve_source(str(source), revision=revision, token=token, quiet=quiet)
    _check_not_overlapping(out_dir, resolved.folder)
    preset = resolved.preset
    block_size = int(block_size or (preset.block_size if preset else 128))
    out_dtype = parse_dtype(dtype or (preset.dtype if preset else "bf16"))
    skip = [*(preset.skip if preset else ()), *skip]

    config, config_dict = _load_config(resolved.folder)
    files = find_checkpoint(resolved.folder)
    started = time.perf_counter()
    with CheckpointReader(files) as reader:
        plan = make_plan(
            config,
            reader.tensors,
            block_size=block_size,
            dtype=out_dtype,
            skip=skip,
            max_shard_size=shard_bytes,
            same_data=lambda a, b: _same_data(reader, a, b),
        )
        _check_space(out_dir, plan)
        with _staged(out_dir, overwrite) as tmp:
            stats, hashes = _stream(reader, plan, tmp, dev, progress)
            _write_index(tmp, plan)
            _write_config(tmp, config_dict, plan)
            _copy_sidecars(resolved.folder, tmp)
            seconds = time.perf_counter() - started
            report = _report(resolved, files, plan, stats, hashes, tmp, seconds, dev)
            report.save(tmp)
            from .hub.card import write_card

            write_card(tmp, report, preset=preset, original_card=resolved.folder / CARD_NAME)
    return report


def _check_not_overlapping(out: Path, source: Path) -> None:
    out_r, src_r = out.resolve(), source.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise OutputExists(f"--out {out} overlaps the source folder {source}", "Write the output to a separate folder.")


def _check_output(out: Path, overwrite: bool) -> None:
    """An existing --out is replaced only with --overwrite, and only if it is an earlier int8 output."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExists(f"{out} already exists", "Pass --overwrite to replace it, or choose another --out.")
        if not out.is_dir():
            raise OutputExists(f"{out} exists and is not a folder; int8 will not replace it")
        if any(out.iterdir()) and not (out / REPORT_NAME).is_file():
            raise OutputExists(
                f"{out} exists and is not an int8 output folder; int8 will not replace it, even with --overwrite",
                "Choose another --out, or remove that folder yourself.",
            )


def _load_config(folder: Path):
    from transformers import AutoConfig

    path = folder / "config.json"
    if not path.is_file():
        raise CorruptCheckpoint(f"{folder} has no config.json", "A transformers checkpoint folder needs config.json.")
    try:
        config_dict = json.loads(path.read_text())
    except ValueError as e:
        raise CorruptCheckpoint(f"{path} is not valid JSON ({e})") from None
    if "quantization_config" in config_dict:
        method = config_dict["quantization_config"].get("quant_method", "?")
        raise UnsupportedModel(
            f"{folder} is already quantized ({method})", "Convert the original full-precision checkpoint instead."
        )
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedModel(f"transformers cannot read {path}: {str(e).splitlines()[0]}") from None
    return config, config_dict


def _same_data(reader: CheckpointReader, a, b) -> bool:
    """Whether two tensors of the checkpoint hold equal data (tied copies)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if reader.shares_storage(a, b):
        return True
    row_bytes = max(1, a.row_numel * itemsize(a.dtype))
    step = max(1, CHUNK_BYTES // row_bytes)
    buf_a = torch.empty(step * row_bytes, dtype=torch.uint8)
    buf_b = torch.empty(step * row_bytes, dtype=torch.uint8)
    for r0 in range(0, a.rows, step):
        r1 = min(a.rows, r0 + step)
        if not torch.equal(reader.read_rows(a, r0, r1, buf_a), reader.read_rows(b, r0, r1, buf_b)):
            return False
    return True


def _check_space(out: Path, plan: ConversionPlan) -> None:
    parent = out.parent if out.parent.exists() else Path.cwd()
    free = shutil.disk_usage(parent).free
    need = plan.bytes_out + (64 << 20)
    if free < need:
        raise OutputError(
            f"not enough disk space at {parent}: the output needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free",
            "Free some space or choose another --out.",
        )


@contextlib.contextmanager
def _staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """Build the output in a hidden folder beside ``out``; move it into place on success only."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.int8-partial-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot create the output folder {out}: {e.strerror}") from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OutputError(
                f"the disk filled up while writing {out}; nothing was left behind",
                "Free some space or choose another --out, then run again.",
            ) from None
        if isinstance(e, OSError) and not isinstance(e, Int8Error):
            raise OutputError(f"writing {out} failed: {e}") from None
        raise
    if out.exists():
        old = out.parent / f".{out.name}.int8-old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


class _Stopped(Exception):
    """Another stage failed; this one stops quietly."""


class _BufferPool:
    """A few reusable byte buffers: reuse keeps memory flat and avoids page-faulting fresh memory."""

    def __init__(self, nbytes: int, count: int, stop: threading.Event):
        self.nbytes = nbytes
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(None)  # allocated on first use
        self._stop = stop

    def take(self, n: int) -> tuple[torch.Tensor, Callable[[], None]]:
        if n > self.nbytes:
            return torch.empty(n, dtype=torch.uint8), _noop
        while True:
            try:
                buf = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stopped from None
        if buf is None:
            buf = torch.empty(self.nbytes, dtype=torch.uint8)
        return buf, lambda: self._free.put(buf)


def _noop() -> None:
    pass


@dataclass
class _Chunk:
    entry: TensorPlan
    r0: int
    r1: int
    data: torch.Tensor
    release: Callable[[], None]


def _row_ranges(e: TensorPlan, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    t = e.source
    if e.action == QUANTIZE and e.layout == "conv1d":
        yield 0, t.rows  # the input dimension is the row dimension: quantize it whole
        return
    row_bytes = max(1, t.row_numel * itemsize(t.dtype))
    step = max(1, chunk_bytes // row_bytes)
    for r0 in range(0, t.rows, step):
        yield r0, min(t.rows, r0 + step)


def _as_bytes(t: torch.Tensor):
    return t.reshape(-1).view(torch.uint8).numpy()


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                raise _Stopped from None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """Torch's OpenMP threads spin at barriers; beside our reader and writer threads they
    oversubscribe the cores and slow quantization down tenfold. Inside the stream every torch
    op runs on the thread that calls it, and `_Workers` spreads chunks over the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Workers:
    """Quantize the row blocks of a chunk on several threads (torch releases the GIL)."""

    def __init__(self, n: int):
        self.n = max(1, n)
        self._pool = ThreadPoolExecutor(self.n, thread_name_prefix="int8-quantize") if self.n > 1 else None

    def quantize(self, w: torch.Tensor, block_size: int, codes: torch.Tensor, scales: torch.Tensor) -> ErrorStats:
        rows = w.shape[0]
        if self._pool is None or rows < 2 * self.n:
            return quantize_into(w, block_size, codes, scales, offset_codes=True)
        step = -(-rows // self.n)
        parts = [
            self._pool.submit(quantize_into, w[r:r + step], block_size, codes[r:r + step], scales[r:r + step], offset_codes=True)
            for r in range(0, rows, step)
        ]
        stats = ErrorStats()
        for f in parts:
            stats.merge(f.result())
        return stats

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _stream(
    reader: CheckpointReader,
    plan: ConversionPlan,
    folder: Path,
    device: torch.device,
    progress: Progress,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[dict[str, ErrorStats], dict[str, str]]:
    """Read, quantize and write every planned tensor; return error stats and shard hashes."""
    with _single_threaded_torch():
        workers = _Workers(_cpu_count() if device.type == "cpu" else 1)
        try:
            return _run_stages(reader, plan, folder, device, progress, chunk_bytes, workers)
        finally:
            workers.close()


def _run_stages(reader, plan, folder, device, progress, chunk_bytes, workers: _Workers):
    stop = threading.Event()
    in_pool = _BufferPool(chunk_bytes, 3, stop)
    out_pool = _BufferPool(chunk_bytes, 3, stop)
    to_compute: queue.Queue = queue.Queue(maxsize=2)
    to_write: queue.Queue = queue.Queue(maxsize=8)
    hashes: dict[str, str] = {}
    failures: list[BaseException] = []

    def read_stage() -> None:
        try:
            for shard in plan.shards:
                _put(to_compute, shard, stop)
                for e in shard.entries:
                    for r0, r1 in _row_ranges(e, chunk_bytes):
                        n = (r1 - r0) * e.source.row_numel * itemsize(e.source.dtype)
                        buf, release = in_pool.take(n)
                        data = reader.read_rows(e.source, r0, r1, buf)
                        _put(to_compute, _Chunk(e, r0, r1, data, release), stop)
            _put(to_compute, None, stop)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the main thread, which raises it
            failures.append(exc)
            stop.set()

    def write_stage() -> None:
        writer: ShardWriter | None = None
        try:
            while True:
                try:
                    msg = to_write.get(timeout=0.1)
                except queue.Empty:
                    if stop.is_set():
                        raise _Stopped from None
                    continue
                if msg is None:
                    return
                if isinstance(msg, ShardPlan):
                    outputs = [o for e in msg.entries for o in e.outputs]
                    writer = ShardWriter(folder / msg.filename, outputs, metadata={"format": "pt"})
                elif msg == "close":
                    hashes[writer.path.name] = writer.close()
                    writer = None
                else:
                    data, release = msg
                    writer.write(data)
                    release()
        except BaseException as exc:
            if not isinstance(exc, _Stopped):
                failures.append(exc)
            stop.set()
            if writer is not None:
                writer.abort()
            while True:  # free what the compute stage is waiting for
                try:
                    msg = to_write.get(timeout=0.2)
                except queue.Empty:
                    return
                if isinstance(msg, tuple):
                    msg[1]()
                if msg is None:
                    return

    def send(item) -> None:
        _put(to_write, item, stop)

    threads = [threading.Thread(target=read_stage, daemon=True), threading.Thread(target=write_stage, daemon=True)]
    for th in threads:
        th.start()
    stats: dict[str, ErrorStats] = {}
    scales: dict[str, torch.Tensor] = {}
    progress.start(sum(e.source.nbytes for s in plan.shards for e in s.entries), len(plan.written))
    open_shard = False
    try:
        while True:
            try:
                item = to_compute.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    raise _Stopped from None
                continue
            if item is None:
                break
            if isinstance(item, ShardPlan):
                if open_shard:
                    send("close")
                send(item)
                open_shard = True
                continue
            e = item.entry
            if e.action == QUANTIZE:
                _quantize_chunk(item, plan.block_size, device, out_pool, stats, scales, send, workers)
            else:
                _keep_chunk(item, out_pool, send)
            progress.advance(item.data.numel() * item.data.element_size(), int(item.r1 == e.source.rows))
        if open_shard:
            send("close")
        send(None)
        threads[1].join()
    except BaseException as exc:
        stop.set()
        for th in threads:
            th.join(timeout=30)
        if isinstance(exc, _Stopped) and failures:
            raise failures[0] from None
        raise
    finally:
        stop.set()
        progress.finish()
    if failures:
        raise failures[0]
    return stats, hashes


def _quantize_chunk(c: _Chunk, block_size: int, device, pool: _BufferPool, stats, scales, send, workers: _Workers) -> None:
    e = c.entry
    out_f, in_f = e.out_features, e.in_features
    w = c.data.t().contiguous() if e.layout == "conv1d" else c.data
    rows = w.shape[0]
    width = packed_columns(in_f) * 4
    if e.name not in scales:
        scales[e.name] = torch.empty(out_f, num_blocks(in_f, block_size), dtype=DTYPES[e.out_dtype])
    r0, r1 = (0, out_f) if e.layout == "conv1d" else (c.r0, c.r1)
    buf, release_out = pool.take(rows * width)
    codes = buf[: rows * width].view(torch.int8).view(rows, width)
    try:
        if device.type == "cpu":
            if width > in_f:
                codes[:, in_f:] = 0
            st = workers.quantize(w, block_size, codes, scales[e.name][r0:r1])
        else:
            codes_d = torch.zeros(rows, width, dtype=torch.int8, device=device)
            scales_d = torch.empty(rows, scales[e.name].shape[1], dtype=scales[e.name].dtype, device=device)
            st = quantize_into(w.to(device), block_size, codes_d, scales_d, offset_codes=True)
            codes.copy_(codes_d)
            scales[e.name][r0:r1].copy_(scales_d)
    except NonFiniteWeights as err:
        release_out()
        raise BadTensor(
            f"tensor {e.source.name!r} in {e.source.file.name} contains {err}: the int8 output would be garbage",
            "The source checkpoint is damaged or was saved from a diverged model; fix or re-download it.",
        ) from None
    finally:
        c.release()
    stats.setdefault(e.name, ErrorStats()).merge(st)
    send((_as_bytes(codes), release_out))
    if c.r1 == e.source.rows:
        send((_as_bytes(scales.pop(e.name)), _noop))
        send((_as_bytes(torch.tensor([out_f, in_f], dtype=torch.int64)), _noop))


def _keep_chunk(c: _Chunk, pool: _BufferPool, send) -> None:
    e = c.entry
    x = c.data
    if e.source.dtype in FLOAT_DTYPES and not _all_finite(x):
        c.release()
        raise BadTensor(
            f"tensor {e.source.name!r} in {e.source.file.name} contains NaN or Inf values: the output would be garbage",
            "The source checkpoint is damaged or was saved from a diverged model; fix or re-download it.",
        )
    if e.out_dtype == e.source.dtype:
        send((_as_bytes(x), c.release))
        return
    target = DTYPES[e.out_dtype]
    nbytes = x.numel() * itemsize(e.out_dtype)
    buf, release_out = pool.take(nbytes)
    y = buf[:nbytes].view(target).view(x.shape).copy_(x)
    c.release()
    if e.out_dtype == "F16" and not _all_finite(y):
        release_out()
        raise BadTensor(
            f"tensor {e.source.name!r} has values beyond float16's range (|x| > 65504)",
            "Convert with --dtype bf16 (same range as fp32) instead.",
        )
    send((_as_bytes(y), release_out))


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``. A float32 sum is one fast pass and is finite whenever every
    value is (barring overflow of the sum itself, which the exact check then settles)."""
    if not x.numel() or bool(torch.isfinite(torch.sum(x, dtype=torch.float32))):
        return True
    return bool(torch.isfinite(x).all())


def _write_index(folder: Path, plan: ConversionPlan) -> None:
    weight_map = {o.name: s.filename for s in plan.shards for e in s.entries for o in e.outputs}
    index = {"metadata": {"total_size": plan.bytes_out}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def quantization_config(plan: ConversionPlan) -> dict:
    """The compressed-tensors ``quantization_config`` for config.json, built with compressed-tensors itself."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="group", group_size=plan.block_size, dynamic=False
        ),
        format="pack-quantized",
    )
    qc = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=plan.ignore,
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **qc.model_dump(exclude={"quant_method"}, mode="json"),
    }


def _write_config(folder: Path, config_dict: dict, plan: ConversionPlan) -> None:
    out = dict(config_dict)
    out["dtype"] = TORCH_NAMES[plan.dtype]
    if "torch_dtype" in out:
        out["torch_dtype"] = TORCH_NAMES[plan.dtype]
    out["quantization_config"] = quantization_config(plan)
    (folder / "config.json").write_text(json.dumps(out, indent=2) + "\n")


def _copy_sidecars(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in SIDECAR_GLOBS:
        for p in sorted(src.glob(pattern)):
            if p.is_file() and not (dst / p.name).exists():
                shutil.copyfile(p, dst / p.name)
                copied.append(p.name)
    return copied


def _report(
    resolved: ResolvedSource,
    files: CheckpointFiles,
    plan: ConversionPlan,
    stats: dict[str, ErrorStats],
    hashes: dict[str, str],
    folder: Path,
    seconds: float,
    device: torch.device,
) -> ConversionReport:
    tensors = []
    for e in plan.entries:
        t = e.source
        common = dict(name=e.name, shape=list(t.shape), source_dtype=t.dtype, reason=e.reason)
        if e.action == QUANTIZE:
            st = stats[e.name]
            tensors.append(
                TensorReport(
                    action="quantized",
                    dtype=e.out_dtype,
                    layout=e.layout,
                    blocks=e.out_features * num_blocks(e.in_features, plan.block_size),
                    max_abs_error=round(st.max_abs, 6),
                    mean_abs_error=round(st.mean_abs, 6),
                    zero_blocks=st.zero_blocks,
                    **common,
                )
            )
        elif e.action == KEEP:
            tensors.append(TensorReport(action="kept", dtype=e.out_dtype, **common))
        else:
            tensors.append(TensorReport(action="dropped", tied_to=e.tied_to, **common))
    entries = []
    for p in sorted(folder.iterdir()):
        if p.name in (CARD_NAME, REPORT_NAME) or not p.is_file():
            continue
        digest = hashes.get(p.name) or sha256_file(p)
        entries.append(FileEntry(p.name, p.stat().st_size, digest))
    return ConversionReport(
        int8_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        source=SourceInfo(
            kind=resolved.kind,
            id=resolved.id,
            preset=resolved.preset.name if resolved.preset else None,
            revision=resolved.revision,
            commit=resolved.commit,
            format=files.format,
            files=[f.name for f in files.files],
        ),
        model=ModelInfo(
            architecture=plan.model_class,
            model_type=plan.model_type,
            task="seq2seq-lm" if plan.is_encoder_decoder else "causal-lm",
        ),
        quantization=QuantizationInfo(block_size=plan.block_size, dtype=TORCH_NAMES[plan.dtype], ignore=plan.ignore),
        totals=Totals(
            bytes_in=files.nbytes,
            bytes_out=sum(f.bytes for f in entries if f.name.endswith(".safetensors")),
            seconds=round(seconds, 3),
            device=str(device),
            tensors_quantized=sum(e.action == QUANTIZE for e in plan.entries),
            tensors_kept=sum(e.action == KEEP for e in plan.entries),
            tensors_dropped=sum(e.action == DROP for e in plan.entries),
            params_quantized=sum(e.source.numel for e in plan.entries if e.action == QUANTIZE),
            params_kept=sum(e.source.numel for e in plan.entries if e.action == KEEP),
        ),
        tensors=tensors,
        files=entries,
        warnings=list(plan.warnings),
    )
