"""Fidelity: the converted checkpoint against its original, tensor by tensor and prediction by prediction.

Tensor level (``reconstruction``), streamed: both checkpoints are read tensor
by tensor in row chunks, never as whole models. For every quantized weight
``|w - q*scale| <= scale/2`` must hold for every value (the bound the scheme
guarantees, see `int8.quantize`; a relative slack of 1e-3 covers float32
arithmetic) and every stored scale must be within ``scale_rtol`` of
``absmax/127`` of the original's block (so inflated scales cannot satisfy the
bound). Every tensor kept unquantized must equal the original rounded to its
stored dtype, exactly. Beside that exact decode (float32 ``q*scale``), the
check reports the error of the weights as the stock loader decodes them:
compressed-tensors evaluates ``q*scale`` in the scale's dtype, so with fp16 or
bf16 scales the product is rounded once more (up to about one scale in all).
That figure (``max_error_scales_as_loaded``) is information, not a bar: a
checkpoint with bf16 scales holds the exact values int8 promises.

Model level (``top1``, ``kl``, ``perplexity``): teacher-forced next-token
predictions on the sample text (see `int8.verify.sample`), of the converted
model and of the reference (see `int8.verify.models`), against the
original's. The thresholds and why they are what they are: `Thresholds`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointReader, find_checkpoint
from ..formats.compressed_tensors import unpack_codes
from ..formats.safetensors import DTYPES, SourceTensor
from ..hf import WeightLayout
from ..quantize import QMAX, dequantize
from .layout import Layout, QuantLayer
from .result import SKIP, Check, Group, Thresholds, outcome

ERROR_SLACK = 1e-3
"""Relative slack on the scale/2 bound: float32 division and product round by about 1e-7."""

ROW_BYTES = 32 << 20


def _subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def _tool_rounding(weight_dtype: str, scale_dtype: torch.dtype) -> float:
    """The relative rounding another tool's quantizer may add to ``|w - q*scale|`` (in units of ``|w| + scale``).

    int8 divides in float32 by the stored scale, so its codes are within half a scale exactly. compressed-tensors
    (llm-compressor's W8A16) divides in the weight's dtype promoted with the scale's, and rounds the scale
    itself to its dtype: with bf16 weights and scales that moves a value by up to about half a scale more
    (at |q| near 127), with float32 ones by nothing that shows."""
    w = DTYPES.get(weight_dtype, torch.float32)
    w = w if w.is_floating_point else torch.float32
    return (torch.finfo(torch.promote_types(w, scale_dtype)).eps + torch.finfo(scale_dtype).eps) / 2


def _where(t) -> str:
    return f"{t.file.name}: {t.name}"


class _Original:
    """The original checkpoint's tensors under the converted model's names."""

    def __init__(self, reader: CheckpointReader, layout: Layout):
        self.reader = reader
        self.by_name: dict[str, SourceTensor] = {}
        for t in reader.tensors:
            self.by_name.setdefault(layout.model_name(t.name), t)
        self.aliases: dict[str, list[str]] = {}
        for copy, source in layout.tied.items():
            self.aliases.setdefault(source, []).append(copy)
            self.aliases.setdefault(copy, []).append(source)

    def find(self, name: str) -> SourceTensor | None:
        for candidate in (name, *self.aliases.get(name, ())):
            if candidate in self.by_name:
                return self.by_name[candidate]
        return None


@dataclass(frozen=True)
class Reconstruction:
    """The ``reconstruction`` check, and the worst error of the weights as the stock loader decodes them (in scales)."""

    check: Check
    max_error_as_loaded: float


def check_reconstruction(layout: Layout, original: Path, thresholds: Thresholds) -> Check:
    """Every tensor of the converted checkpoint against the original's (see the module docstring)."""
    return reconstruction(layout, original, thresholds).check


def reconstruction(layout: Layout, original: Path, thresholds: Thresholds) -> Reconstruction:
    """`check_reconstruction`, with the as-loaded error apart for the metrics."""
    problems: list[str] = []
    worst = 0.0
    worst_loaded = 0.0
    worst_scale = 0.0
    kept_ok = 0
    with CheckpointReader(find_checkpoint(original)) as orig_reader, CheckpointReader(
        find_checkpoint(layout.folder)
    ) as conv_reader:
        orig = _Original(orig_reader, layout)
        stored = {t.name: t for t in conv_reader.tensors}
        for q in layout.quantized.values():
            src = orig.find(f"{q.module}.weight")
            if src is None:
                problems.append(f"{_where(q.packed)}: the original has no tensor {q.module}.weight to compare with")
                continue
            want = (q.in_features, q.out_features) if q.layout == WeightLayout.CONV1D else (q.out_features, q.in_features)
            if tuple(src.shape) != want:
                problems.append(
                    f"{_where(q.packed)}: the original's {src.name} has shape {list(src.shape)}, the converted weight "
                    f"[{q.out_features}, {q.in_features}]" + (" (Conv1D: [in, out])" if q.layout == WeightLayout.CONV1D else "")
                )
                continue
            err, loaded, rel, found = _layer(q, src, orig_reader, conv_reader, stored, q.group, thresholds,
                                             own=layout.origin.own)
            worst, worst_loaded, worst_scale = max(worst, err), max(worst_loaded, loaded), max(worst_scale, rel)
            problems += found
        ok, found = kept_problems(layout, orig.find, orig_reader, conv_reader, stored)
        kept_ok += ok
        problems += found
    figure = (
        f"max |w - q*scale| = {worst:.3f} scale over {len(layout.quantized)} layers "
        f"({worst_loaded:.3f} with q*scale in the scales' dtype, as stock loaders decode it); "
        f"scales within {worst_scale:.2%} of absmax/127; {kept_ok}/{len(layout.kept)} other tensors identical"
    )
    threshold = (
        f"<= 0.5 scale; scales within {thresholds.scale_rtol:.0%} of absmax/127; the rest equal" if layout.origin.own
        else "<= 0.5 scale, plus the rounding of the tool's arithmetic in the weights' and scales' dtype "
        "(another tool's scale rule: scales not held to absmax/127); the rest equal"
    )
    check = outcome("reconstruction", problems, figure=figure, threshold=threshold, group=Group.FIDELITY, value=worst)
    return Reconstruction(check, worst_loaded)


def kept_problems(layout: Layout, find, orig_reader, conv_reader, stored) -> tuple[int, list[str]]:
    """(how many, what is wrong): each tensor the checkpoint keeps unquantized against the original's (``find(name)``
    its source tensor or None), which it must equal once rounded to the kept dtype."""
    ok, problems = 0, []
    for name, t in layout.kept.items():
        src = find(name)
        if src is None:
            problems.append(f"{_where(t)}: the original has no tensor {name} to compare with")
            continue
        if tuple(src.shape) != tuple(t.shape):
            problems.append(f"{_where(t)} has shape {list(t.shape)}, the original's {src.name} {list(src.shape)}")
            continue
        mine = conv_reader.read(stored[name])
        theirs = orig_reader.read(src).to(mine.dtype)
        if torch.equal(mine, theirs):
            ok += 1
            continue
        differ = mine != theirs
        if mine.is_floating_point():
            differ &= ~(torch.isnan(mine) & torch.isnan(theirs))
        i = int(differ.reshape(-1).nonzero()[0])
        problems.append(
            f"{_where(t)} differs from the original's {src.name} rounded to {t.dtype} at {int(differ.sum())} "
            f"value(s) (first at flat index {i}: {mine.reshape(-1)[i].item():.6g} vs {theirs.reshape(-1)[i].item():.6g})"
        )
    return ok, problems


def _layer(
    q: QuantLayer,
    src: SourceTensor,
    orig_reader: CheckpointReader,
    conv_reader: CheckpointReader,
    stored: dict,
    g: int,
    thresholds: Thresholds,
    own: bool = True,
) -> tuple[float, float, float, list[str]]:
    """(max error in scales, the same as the stock loader decodes, max relative scale deviation, problems) of one layer.

    For another tool's checkpoint (not ``own``, `int8.verify.provenance`) the scales are not held to
    absmax/127 (their deviation is reported), and the half-a-scale bound allows for the rounding of that
    tool's arithmetic (`_tool_rounding`)."""
    packed_t, scale_t = stored[q.packed.name], stored[q.scale.name]
    sdtype = torch.float32
    in_f = q.in_features
    whole = orig_reader.read(src).float().t().contiguous() if q.layout == WeightLayout.CONV1D else None
    step = max(1, ROW_BYTES // max(1, in_f * 4))
    worst = worst_loaded = worst_rel = 0.0
    bad_err = bad_scale = 0
    first_err = first_scale = None
    for r0 in range(0, q.out_features, step):
        r1 = min(q.out_features, r0 + step)
        if whole is not None:
            w = whole[r0:r1]
        else:
            buf = torch.empty((r1 - r0) * in_f * 8, dtype=torch.uint8)
            w = orig_reader.read_rows(src, r0, r1, buf).float()
        pbuf = torch.empty((r1 - r0) * packed_t.row_numel * 4, dtype=torch.uint8)
        sbuf = torch.empty((r1 - r0) * scale_t.row_numel * 8, dtype=torch.uint8)
        codes = unpack_codes(conv_reader.read_rows(packed_t, r0, r1, pbuf), in_f)
        scales = conv_reader.read_rows(scale_t, r0, r1, sbuf)
        sdtype = scales.dtype
        s = scales.float()
        wq = dequantize(codes, scales, g, torch.float32)
        s_full = s.repeat_interleave(g, dim=1)[:, :in_f]
        err = (w - wq).abs()
        bound = s_full * (0.5 * (1 + ERROR_SLACK)) + QMAX * _subnormal(sdtype)
        if not own:
            bound = bound + (w.abs() + s_full) * _tool_rounding(src.dtype, sdtype)
        ratio = torch.where(s_full > 0, err / s_full.clamp_min(1e-45), torch.where(err > 0, math.inf, 0.0))
        over = err > bound
        worst = max(worst, float(ratio.max()) if ratio.numel() else 0.0)
        worst_loaded = max(worst_loaded, _as_loaded(w, codes, scales, s_full, g))
        if bool(over.any()):
            bad_err += int(over.sum())
            if first_err is None:
                r, c = (int(i) for i in over.nonzero()[0])
                first_err = (r0 + r, c, float(ratio[r, c]))
        # scales against absmax / 127 of the original's blocks
        pad = (-in_f) % g
        wb = torch.nn.functional.pad(w, (0, pad)) if pad else w
        amax = wb.abs().view(r1 - r0, -1, g).amax(-1)
        want = amax / QMAX
        dev = (s - want).abs()
        allowed = thresholds.scale_rtol * want + _subnormal(sdtype)
        rel = torch.where(want > 0, dev / want.clamp_min(1e-45), torch.where(dev > 0, math.inf, 0.0))
        worst_rel = max(worst_rel, float(rel.max()) if rel.numel() else 0.0)
        off = ~(dev <= allowed)  # NaN counts as off
        if own and bool(off.any()):
            bad_scale += int(off.sum())
            if first_scale is None:
                r, b = (int(i) for i in off.nonzero()[0])
                first_scale = (r0 + r, b, float(s[r, b]), float(want[r, b]))
    problems = []
    if first_err is not None:
        r, c, x = first_err
        problems.append(
            f"{_where(q.packed)}: {bad_err} value(s) of {q.module} are reconstructed beyond half a scale from the "
            f"original (first at row {r}, column {c}: |w - q*scale| = {x:.3g} scale)"
        )
    if first_scale is not None:
        r, b, got, want_s = first_scale
        problems.append(
            f"{_where(q.scale)}: {bad_scale} scale(s) are not absmax/127 of the original's block "
            f"(first at row {r}, block {b}: {got:.6g}, expected {want_s:.6g})"
        )
    return worst, worst_loaded, worst_rel, problems


def _as_loaded(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, s_full: torch.Tensor, g: int) -> float:
    """Worst |w - q*scale| in scales with the product rounded to the scales' dtype, as compressed-tensors computes it.

    Codes are exact in every scale dtype (|q| <= 127), and a float32 product rounded to fp16/bf16 is the
    correctly rounded product in that dtype, so this is the stock loader's weight bit for bit."""
    loaded = dequantize(codes, scales, g, scales.dtype).float()
    err = (w - loaded).abs()
    ratio = torch.where(s_full > 0, err / s_full.clamp_min(1e-45), torch.where(err > 0, math.inf, 0.0))
    return float(ratio.max()) if ratio.numel() else 0.0


# --------------------------------------------------------------------------- model-level metrics


@dataclass
class Agreement:
    """Running totals of a model's predictions against the original's, window by window."""

    tokens: int = 0
    top1: int = 0
    kl_sum: float = 0.0
    nll_original: float = 0.0
    nll_model: float = 0.0
    nonfinite: int = 0
    vocab_mismatch: str | None = None

    def update(self, original_logprobs: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if logits.shape[-1] != original_logprobs.shape[-1]:
            self.vocab_mismatch = (
                f"the converted model predicts over {logits.shape[-1]} tokens, the original over "
                f"{original_logprobs.shape[-1]}"
            )
            return
        n = targets.numel()
        self.nonfinite += int((~torch.isfinite(logits)).sum())
        lp = torch.log_softmax(logits.float(), dim=-1)
        p_orig = original_logprobs.exp()
        kl = (p_orig * (original_logprobs - lp)).sum(-1)
        self.kl_sum += float(kl.sum())
        self.top1 += int((original_logprobs.argmax(-1) == lp.argmax(-1)).sum())
        idx = targets.view(-1, 1)
        self.nll_original -= float(original_logprobs.gather(-1, idx).sum())
        self.nll_model -= float(lp.gather(-1, idx).sum())
        self.tokens += n

    @property
    def top1_rate(self) -> float:
        return self.top1 / self.tokens if self.tokens else math.nan

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else math.nan

    @property
    def ppl_original(self) -> float:
        return math.exp(self.nll_original / self.tokens) if self.tokens else math.nan

    @property
    def ppl_model(self) -> float:
        if not self.tokens:
            return math.nan
        x = self.nll_model / self.tokens
        return math.exp(x) if x < 700 else math.inf

    @property
    def ppl_ratio(self) -> float:
        if not self.tokens:
            return math.nan
        d = (self.nll_model - self.nll_original) / self.tokens
        return math.exp(d) if d < 700 else math.inf


@dataclass(frozen=True)
class ReferenceBars:
    """What the reference's noise draws make of the thresholds: each bar from the least favourable draw."""

    draws: int
    kl: float  # the largest mean KL of the draws (nan: no draw)
    kl_least: float
    top1: float  # the lowest top-1 agreement of the draws (nan: no draw)
    top1_best: float

    @classmethod
    def of(cls, references) -> ReferenceBars:
        done = [r for r in references if r.tokens]
        if not done:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        kls, top1s = [r.mean_kl for r in done], [r.top1_rate for r in done]
        return cls(len(done), max(kls), min(kls), min(top1s), max(top1s))

    def top1_bar(self, t: Thresholds) -> float:
        return min(t.top1_min, self.top1 - t.top1_slack) if self.draws else t.top1_min

    def kl_bar(self, t: Thresholds) -> float:
        return min(t.kl_factor * self.kl, t.kl_max) if self.draws else t.kl_max


def metric_checks(converted: Agreement, references, thresholds: Thresholds) -> tuple[list[Check], dict]:
    """The top1, kl and perplexity checks, and the figures for the report's metrics.

    ``references`` holds one `Agreement` per noise draw of the reference; the bars are relative to the least
    favourable draw (the largest KL, the lowest top-1), so that the luck of one draw cannot fail a good checkpoint."""
    t = thresholds
    ref = ReferenceBars.of(references)
    metrics = {
        "tokens": converted.tokens,
        "top1_agreement": round(converted.top1_rate, 6),
        "top1_reference": round(ref.top1, 6),
        "top1_reference_best": round(ref.top1_best, 6),
        "mean_kl": converted.mean_kl,
        "mean_kl_reference": ref.kl,
        "mean_kl_reference_least": ref.kl_least,
        "reference_draws": ref.draws,
        "ppl_original": converted.ppl_original,
        "ppl_converted": converted.ppl_model,
        "ppl_ratio": converted.ppl_ratio,
    }
    broken = []
    if converted.vocab_mismatch:
        broken.append(converted.vocab_mismatch)
    if converted.nonfinite:
        broken.append(f"the converted model produced {converted.nonfinite} NaN or infinite logits")
    draws = f"{ref.draws} noise draws" if ref.draws != 1 else "1 noise draw"

    top1_bar = ref.top1_bar(t)
    top1_problems = list(broken)
    if not broken and not converted.top1_rate >= top1_bar:
        top1_problems.append(
            f"the converted model's top-1 next token agrees with the original's on {converted.top1_rate:.1%} of "
            f"{converted.tokens} positions; ideal int8 noise agrees on {ref.top1:.1%} or more ({draws})"
        )
    top1 = outcome(
        "top1",
        top1_problems,
        figure=f"{converted.top1_rate:.1%} of {converted.tokens} tokens (reference {_span(ref.top1, ref.top1_best, '.1%')})",
        threshold=f">= {top1_bar:.1%} (min({t.top1_min:.0%}, lowest reference - {t.top1_slack:.0%}))",
        group=Group.FIDELITY,
        value=converted.top1_rate,
    )

    kl_bar = ref.kl_bar(t)
    kl_problems = list(broken)
    if not broken and not converted.mean_kl <= kl_bar:
        times = converted.mean_kl / ref.kl if ref.kl > 0 else math.inf
        kl_problems.append(
            f"mean KL divergence from the original is {converted.mean_kl:.3g} nats/token, {times:.3g}x the most "
            f"that ideal int8 rounding cost in {draws} ({ref.kl:.3g}); the converted weights are not the original's"
        )
    kl = outcome(
        "kl",
        kl_problems,
        figure=f"{converted.mean_kl:.3g} nats/token (reference {_span(ref.kl_least, ref.kl, '.3g')})",
        threshold=f"<= {kl_bar:.3g} (min({t.kl_factor:g} x largest reference, {t.kl_max:g}))",
        group=Group.FIDELITY,
        value=converted.mean_kl,
    )

    ratio = converted.ppl_ratio
    ppl_problems = list(broken)
    if not broken and not (1 / t.ppl_ratio_max <= ratio <= t.ppl_ratio_max):
        ppl_problems.append(
            f"perplexity on the sample is {converted.ppl_model:.4g}, the original's {converted.ppl_original:.4g} "
            f"(ratio {ratio:.4f})"
        )
    ppl = outcome(
        "perplexity",
        ppl_problems,
        figure=f"{converted.ppl_model:.4g} vs {converted.ppl_original:.4g} (ratio {ratio:.4f})",
        threshold=f"ratio within {1 / t.ppl_ratio_max:.4f}..{t.ppl_ratio_max:.4f}",
        group=Group.FIDELITY,
        value=ratio,
    )
    return [top1, kl, ppl], metrics


def _span(low: float, high: float, spec: str) -> str:
    """``low..high`` of the reference's draws (one figure when they agree)."""
    a, b = format(low, spec), format(high, spec)
    return a if a == b else f"{a}..{b}"


# --------------------------------------------------------------------------- tokenizer and config against the original

CONVERSION_KEYS = frozenset({"quantization_config", "dtype", "torch_dtype", "transformers_version", "_name_or_path"})
"""config.json keys that conversion sets or that say nothing about the model; every other key must be the original's."""
GENERATION_IGNORED = frozenset({"transformers_version"})


def check_same_tokenizer(original, converted, text: str) -> Check:
    """The converted folder's tokenizer must be the original's: same vocabulary, same ids for the sample."""
    threshold = "the original's vocabulary, special tokens and token ids on the sample"
    if original is None:
        return Check("same_tokenizer", True, figure="not run: the original has no tokenizer that loads",
                     threshold=threshold, group=Group.FIDELITY, status=SKIP,
                     detail="the original has no tokenizer that loads")
    if converted is None:
        return outcome("same_tokenizer", ["the converted folder's tokenizer does not load"], figure="does not load",
                       threshold=threshold, group=Group.FIDELITY)
    problems: list[str] = []
    try:
        vocab_o, vocab_c = original.get_vocab(), converted.get_vocab()
    except Exception:  # a tokenizer without a vocabulary mapping: compare the ids alone
        vocab_o = vocab_c = {}
    if vocab_o != vocab_c:
        moved = sorted(t for t in set(vocab_o) & set(vocab_c) if vocab_o[t] != vocab_c[t])
        only = len(set(vocab_o) ^ set(vocab_c))
        what = []
        if moved:
            what.append(f"{len(moved)} token(s) have other ids (e.g. {moved[0]!r}: {vocab_o[moved[0]]} -> {vocab_c[moved[0]]})")
        if only:
            what.append(f"{only} token(s) are in one vocabulary only")
        problems.append("the vocabulary differs from the original's: " + "; ".join(what))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(original, attr, None), getattr(converted, attr, None)
        if a != b:
            problems.append(f"{attr} is {b!r}, the original's is {a!r}")
    for special in (False, True):
        ids_o = original(text, add_special_tokens=special)["input_ids"]
        ids_c = converted(text, add_special_tokens=special)["input_ids"]
        if ids_o != ids_c:
            at = next((i for i, (x, y) in enumerate(zip(ids_o, ids_c, strict=False)) if x != y), min(len(ids_o), len(ids_c)))
            problems.append(
                f"the sample tokenizes differently{' with special tokens' if special else ''}: "
                f"{len(ids_c)} ids against the original's {len(ids_o)}, first difference at position {at}"
            )
            break
    figure = f"{len(vocab_c) or len(converted)} tokens, sample ids identical" if not problems else f"{len(problems)} difference(s)"
    return outcome("same_tokenizer", problems, figure=figure, threshold=threshold, group=Group.FIDELITY)


def _json_or_none(path: Path) -> tuple[object, str]:
    import json

    if not path.is_file():
        return None, ""
    try:
        return json.loads(path.read_text(encoding="utf-8")), ""
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return None, f"{path.name} cannot be read ({type(e).__name__})"


def _differences(original: dict, converted: dict, ignored: frozenset[str], where: str) -> list[str]:
    out = []
    for key in sorted((set(original) | set(converted)) - ignored):
        if key not in converted:
            out.append(f"{where}: {key} is missing (the original has {original[key]!r})")
        elif key not in original:
            out.append(f"{where}: {key} = {converted[key]!r} is not in the original's")
        elif original[key] != converted[key]:
            out.append(f"{where}: {key} is {converted[key]!r}, the original's is {original[key]!r}")
    return out


def check_same_config(original: Path, converted: Path) -> Check:
    """config.json (less what conversion sets) and generation_config.json must be the original's."""
    threshold = "config.json and generation_config.json as the original's (quantization_config and dtype apart)"
    problems: list[str] = []
    for name, ignored in (("config.json", CONVERSION_KEYS), ("generation_config.json", GENERATION_IGNORED)):
        a, why_a = _json_or_none(Path(original) / name)
        b, why_b = _json_or_none(Path(converted) / name)
        problems += [f"the original's {w}" if w is why_a else w for w in (why_a, why_b) if w]
        if why_a or why_b:
            continue
        if a is None and b is None:
            continue
        if a is None or b is None:
            problems.append(f"{name} is {'missing' if b is None else 'present'} here, but "
                            f"{'present' if a is not None else 'missing'} in the original")
            continue
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                problems.append(f"{name} differs from the original's")
            continue
        problems += _differences(a, b, ignored, name)
    return outcome("same_config", problems, figure="identical" if not problems else f"{len(problems)} difference(s)",
                   threshold=threshold, group=Group.FIDELITY)
