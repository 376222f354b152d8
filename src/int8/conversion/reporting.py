"""The conversion report (`int8.report.ConversionReport`) of a finished run: what became of every
tensor and why, the per-tensor error statistics the engine measured, sizes, times and the SHA-256
manifest of every file written."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from .. import __version__
from ..checkpoint import CheckpointFiles
from ..files import CARD_NAME, REPORT_NAME, sha256_file
from ..formats import OutputFormat
from ..formats import bitsandbytes as bnb_format
from ..hf import TORCH_NAMES
from ..report import (
    ConversionReport,
    FileEntry,
    ModelInfo,
    QuantizationInfo,
    SourceInfo,
    TensorReport,
    Totals,
    block_groups,
    public_source_id,
)
from ..scheme import ErrorStats, num_blocks
from ..sources import ResolvedSource
from .plan import DROP, KEEP, QUANTIZE, ConversionPlan


def build_report(
    resolved: ResolvedSource,
    files: CheckpointFiles,
    plan: ConversionPlan,
    stats: dict[str, ErrorStats],
    hashes: dict[str, str],
    folder: Path,
    seconds: float,
    stream_seconds: float,
    device: str,
) -> ConversionReport:
    """The report of a run: ``stats`` are the engine's error statistics per quantized tensor, ``hashes``
    the SHA-256 it computed of the shards as they were written (other files of ``folder`` are hashed here)."""
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
                    block_size=e.block_size,
                    blocks=e.out_features * num_blocks(e.in_features, e.block_size),
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
            id=public_source_id(resolved.kind, resolved.id),
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
        quantization=_quantization(plan, tensors),
        totals=Totals(
            bytes_in=files.nbytes,
            bytes_out=sum(f.bytes for f in entries if f.name.endswith(".safetensors")),
            seconds=round(seconds, 3),
            stream_seconds=round(stream_seconds, 3),
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


def _quantization(plan: ConversionPlan, tensors: list[TensorReport]) -> QuantizationInfo:
    common = dict(dtype=TORCH_NAMES[plan.dtype], ignore=plan.ignore, scale_dtype=TORCH_NAMES[plan.scale_dtype],
                  block_groups=block_groups(tensors), embeddings=plan.embeddings.value)
    if plan.format == OutputFormat.BNB:  # a block is a row: the report's block size is the widest row
        widest = max((e.in_features for e in plan.quantized), default=0)
        return QuantizationInfo(block_size=widest, format=bnb_format.REPORT_FORMAT, scheme=bnb_format.REPORT_SCHEME,
                                rounding=bnb_format.REPORT_ROUNDING, **common)
    return QuantizationInfo(block_size=plan.block_size, **common)
