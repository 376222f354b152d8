"""`int8 convert`: stream an FP32/FP16/BF16 checkpoint into an int8 checkpoint.

The orchestrator: check what the user typed, resolve the source (preset, Hub id or folder), read
its config and tensor headers, plan every tensor (`int8.conversion.plan`), stream the data through
the engine (`int8.conversion.engine`: worker threads quantizing row chunks in place, a writer
appending them to the shards in plan order, SHA-256 on its own thread; memory flat whatever the
model's size), then write the index, config, side files, report and card. Everything is built in a
staging folder beside the output and swapped into place only when complete
(`int8.conversion.output`): an interrupted or failed run leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .. import options
from ..blocks import DEFAULT_BLOCK_SIZE
from ..checkpoint import SIDECAR_FILES, CheckpointReader, find_checkpoint
from ..errors import CorruptCheckpoint, OutputError, OutputExists, UnsupportedModel, first_line
from ..files import CARD_NAME
from ..formats import OutputFormat
from ..formats import bitsandbytes as bnb_format
from ..formats.compressed_tensors import build_config
from ..formats.safetensors import itemsize, write_index
from ..hf import TORCH_NAMES, device_name, parse_dtype
from ..paths import copy_inside, inside
from ..report import (
    ConversionReport,
)
from ..sources import resolve_source
from .engine import CHUNK_BYTES, stream
from .output import check_replaceable
from .output import start as start_staging
from .plan import (
    ConversionPlan,
    make_plan,
    unmatched_patterns,
)
from .reporting import build_report


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


def default_output(source: str | Path) -> Path:
    """./NAME-int8, NAME being the preset, the repo's name or the folder's name.

    For a local folder that holds the current folder (`int8 convert .`), the output goes beside
    that folder instead: it cannot be written inside its own source."""
    path = Path(str(source)).expanduser()
    if path.exists():
        folder = path.resolve()
        out = Path.cwd() / f"{folder.name or 'model'}-int8"
        return folder.parent / out.name if folder == Path.cwd().resolve() or folder in out.resolve().parents else out
    return Path.cwd() / f"{str(source).rstrip('/').rsplit('/', 1)[-1] or 'model'}-int8"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in TOKENIZER_FILES) or any(folder.glob("sentencepiece*.model"))


def convert(
    source: str | Path,
    out: str | Path | None = None,
    *,
    block_size: int | None = None,
    dtype: str | None = None,
    scale_dtype: str | None = None,
    device: str = "auto",
    skip: Sequence[str] = (),
    embeddings: str = "keep",
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    token: str | bool | None = None,
    progress: Progress | None = None,
    quiet: bool = True,
    on_warning: Callable[[str], None] | None = None,
    format: str | OutputFormat = OutputFormat.COMPRESSED_TENSORS,
) -> ConversionReport:
    """Convert a checkpoint to int8; return the report (also saved in the output folder).

    ``source`` is a preset name (see `int8.presets`), a local folder or a Hub
    repo id. ``out`` defaults to ``./<name>-int8``; an existing ``out`` is replaced only with
    ``overwrite`` and only when int8 provably wrote it (see `int8.conversion.output`). ``on_warning`` is
    called with each warning as soon as it is known (before the tensors stream); the warnings
    are also in the report. Raises `int8.errors.Int8Error` subclasses for every problem with
    the input or output.

    ``dtype`` (fp16, bf16, fp32) is the dtype of everything not quantized; ``scale_dtype`` that of
    the weight scales. Each defaults to the preset's, else bf16 and fp32: stock loaders decode
    ``code * scale`` in the scale's dtype, so bf16 scales would round every weight a second time.

    ``embeddings``: ``"keep"`` (default) or ``"int8"``, which quantizes the token embeddings and the output
    head too (`int8.conversion.plan.Embeddings`; loaders: `int8.formats.compressed_tensors.EMBEDDING_LOADERS`).

    ``format`` is ``compressed-tensors`` (block-wise, the default) or ``bnb``: transformers' serialized
    bitsandbytes ``load_in_8bit`` layout (one float32 scale per row; ``block_size`` and ``scale_dtype``
    do not apply and are refused).
    """
    progress = progress or _NoProgress()
    # Everything the user typed is checked before anything is downloaded.
    dev = device_name(device)
    if dtype is not None:
        parse_dtype(dtype)
    if scale_dtype is not None:
        parse_dtype(scale_dtype)
    if block_size is not None and block_size < 1:
        raise UnsupportedModel(f"--block-size must be a positive integer, got {block_size}")
    out_format = options.output_format(format)
    options.format_allows(out_format, block_size=block_size, scale_dtype=scale_dtype, embeddings=embeddings)
    shard_bytes = options.shard_size(max_shard_size)
    user_skip = options.skip_patterns(skip)
    embeddings_mode = options.embeddings(embeddings)
    options.local_revision(source, revision)
    out_dir = options.output_folder(out if out is not None else default_output(source))
    check_replaceable(out_dir, overwrite)

    resolved = resolve_source(str(source), revision=revision, token=token, quiet=quiet)
    _check_not_overlapping(out_dir, resolved.folder)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        if on_warning is not None:
            on_warning(message)

    if not has_tokenizer(resolved.folder):
        warn(
            f"{resolved.id} has no tokenizer: the conversion goes on, but `int8 verify` and `int8 push` need one. "
            "Save it into the source folder (tokenizer.save_pretrained(folder)) and convert again"
        )
    preset = resolved.preset
    block_size = int(block_size or (preset.block_size if preset else DEFAULT_BLOCK_SIZE))
    out_dtype = parse_dtype(dtype or (preset.dtype if preset else "bf16"))
    out_scale_dtype = parse_dtype(scale_dtype or (preset.scale_dtype if preset else "fp32"))
    skip = [*(preset.skip if preset else ()), *user_skip]

    _check_sidecars(resolved.folder)
    config, config_dict = _load_config(resolved.folder)
    files = find_checkpoint(resolved.folder)
    started = time.perf_counter()
    with CheckpointReader(files) as reader:
        plan = make_plan(
            config,
            reader.tensors,
            block_size=block_size,
            dtype=out_dtype,
            scale_dtype=out_scale_dtype,
            skip=skip,
            max_shard_size=shard_bytes,
            same_data=lambda a, b: _same_data(reader, a, b),
            embeddings=embeddings_mode,
            format=out_format,
        )
        unmatched = unmatched_patterns(plan, user_skip)
        if unmatched:
            warn(f"--skip {', '.join(repr(p) for p in unmatched)} matched no module of {plan.model_class}, so it changes nothing")
        for w in plan.warnings:
            warn(w)
        _check_space(out_dir, plan)
        with _staged(out_dir, overwrite) as tmp:
            original_card = None  # the source's card metadata, read while the tensors stream

            def meanwhile() -> None:
                """While the tensors stream: everything that does not need their results."""
                nonlocal original_card
                _write_index(tmp, plan)
                _write_config(tmp, config_dict, plan)
                _copy_sidecars(resolved.folder, tmp)
                from ..hub import card

                card.preload()
                if (resolved.folder / CARD_NAME).is_file():
                    original_card = card.original_metadata(resolved.folder / CARD_NAME)

            streamed = stream(reader, plan, tmp, dev, progress, meanwhile=meanwhile)
            seconds = time.perf_counter() - started
            report = build_report(resolved, files, plan, streamed.stats, streamed.hashes, tmp, seconds, streamed.seconds, dev)
            report.warnings = [*warnings, *(w for w in report.warnings if w not in warnings)]
            report.save(tmp)
            from ..hub.card import write_card

            write_card(tmp, report, preset=preset, original=original_card)
    return report


def _check_not_overlapping(out: Path, source: Path) -> None:
    out_r, src_r = out.resolve(), source.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise OutputExists(f"--out {out} overlaps the source folder {source}", "Write the output to a separate folder.")


def _load_config(folder: Path):
    from ..hf import load_config, read_json_object, refuse_remote_code

    path = folder / "config.json"
    if not path.is_file():
        raise CorruptCheckpoint(f"{folder} has no config.json", "A transformers checkpoint folder needs config.json.")
    config_dict = read_json_object(path, what=str(path))
    if "quantization_config" in config_dict:
        qc = config_dict["quantization_config"]
        if not isinstance(qc, dict):
            raise CorruptCheckpoint(f"{path}: quantization_config is {json.dumps(qc)[:40]}, not an object",
                                    "A full-precision checkpoint has no quantization_config: remove the key.")
        raise UnsupportedModel(
            f"{folder} is already quantized ({qc.get('quant_method', '?')}: config.json has a quantization_config)",
            "Convert the original full-precision checkpoint instead.",
        )
    from ..architectures import Config, from_table

    if from_table(config_dict) is not None:  # an architecture of int8's table: no transformers needed to plan
        refuse_remote_code(folder)
        return Config(config_dict, folder), config_dict
    try:
        config = load_config(folder)
    except (ValueError, KeyError, OSError, TypeError, AttributeError) as e:
        raise UnsupportedModel(f"transformers cannot read {path}: {first_line(e)}") from None
    return config, config_dict


def _same_data(reader: CheckpointReader, a, b) -> bool:
    """Whether two tensors of the checkpoint hold the same bytes (tied copies)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if reader.shares_storage(a, b):
        return True
    row_bytes = max(1, a.row_numel * itemsize(a.dtype))
    step = max(1, CHUNK_BYTES // row_bytes)
    buf_a = np.empty(step * row_bytes, np.uint8)
    buf_b = np.empty(step * row_bytes, np.uint8)
    for r0 in range(0, a.rows, step):
        r1 = min(a.rows, r0 + step)
        nbytes = (r1 - r0) * row_bytes
        reader.read_rows_array(a, r0, r1, buf_a)
        reader.read_rows_array(b, r0, r1, buf_b)
        if not np.array_equal(buf_a[:nbytes], buf_b[:nbytes]):
            return False
    return True


def _check_space(out: Path, plan: ConversionPlan) -> None:
    parent = next((p for p in out.parents if p.exists()), Path.cwd())
    free = shutil.disk_usage(parent).free
    need = plan.bytes_out + (64 << 20)
    if free < need:
        raise OutputError(
            f"not enough disk space at {parent}: the output needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free",
            "Free some space or choose another --out.",
        )


@contextlib.contextmanager
def _staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """Build the output in a locked staging folder beside ``out``; move it into place on success only.

    `int8.conversion.output` holds the rules: what may be replaced (checked again at the end), the exclusive
    atomic rename, the cleaning of staging folders left by killed runs."""
    try:
        staging = start_staging(out, overwrite)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {out}: {e.strerror}") from None
    try:
        yield staging.folder
    except BaseException as e:
        staging.discard()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OutputError(
                f"the disk filled up while writing {out}; nothing was left behind",
                "Free some space or choose another --out, then run again.",
            ) from None
        if isinstance(e, OSError):
            raise OutputError(f"writing {out} failed: {e}") from None
        raise
    try:
        staging.finish()
    except OSError as e:
        raise OutputError(f"moving the output into place at {out} failed: {e.strerror or e}; nothing was left behind") from None


def _write_index(folder: Path, plan: ConversionPlan) -> None:
    write_index(folder, {o.name: s.filename for s in plan.shards for e in s.entries for o in e.outputs}, plan.bytes_out)


def _write_config(folder: Path, config_dict: dict, plan: ConversionPlan) -> None:
    out = dict(config_dict)
    out["dtype"] = TORCH_NAMES[plan.dtype]
    if "torch_dtype" in out:
        out["torch_dtype"] = TORCH_NAMES[plan.dtype]
    if plan.format == OutputFormat.BNB:
        out["quantization_config"] = bnb_format.build_config(plan.ignore)
    else:
        out["quantization_config"] = build_config(plan.groups, plan.ignore, plan.quantized_embeddings)
    (folder / "config.json").write_text(json.dumps(out, indent=2) + "\n")


def _check_sidecars(src: Path) -> None:
    """Before any work: every other file of the source that int8 reads (config.json, the card, the
    side files) lies inside the source folder once resolved (`UnsafePath` otherwise)."""
    for name in ("config.json", CARD_NAME):
        if (src / name).exists() or (src / name).is_symlink():
            inside(src, name)
    for pattern in SIDECAR_FILES:
        for p in src.glob(pattern):
            inside(src, p.name, what="side file")


def _copy_sidecars(src: Path, dst: Path) -> list[str]:
    """Copy the side files (tokenizer, generation config, license) byte for byte. Each must lie
    inside the source folder once resolved: a link out of it (to ~/.cache/huggingface/token, say)
    refuses the conversion (`UnsafePath`) rather than carrying that file into the output."""
    copied = []
    for pattern in SIDECAR_FILES:
        for p in sorted(src.glob(pattern)):
            if not (p.is_file() or p.is_symlink()) or (dst / p.name).exists():
                continue
            inside(src, p.name, what="side file")
            if p.is_file():  # a dangling link inside the folder is skipped
                copy_inside(src, p.name, dst / p.name, what="side file")
                copied.append(p.name)
    return copied


