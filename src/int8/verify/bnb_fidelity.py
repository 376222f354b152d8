"""The model-level checks particular to a bitsandbytes 8-bit checkpoint: how it loads, and its tensors
against the original's. The rest of the model-level phases (`int8.verify.phases`) is shared.

* load: stock ``from_pretrained(folder)`` with no quantization_config (transformers reads config.json's)
  builds a ``bnb.nn.Linear8bitLt`` holding the int8 weight for every quantized layer, with no missing or
  unexpected keys.
* reconstruction: each weight decoded as bitsandbytes decodes it (``q * SCB * (1/127)`` in float32)
  lies within half a row step (``SCB / 127``) of the original cast to float16 (what bitsandbytes
  quantizes), every SCB is the absmax of its float16 row, and every other tensor equals the
  original's rounded to its stored dtype. The figure also gives the error against the float32
  original (the float16 cast adds up to half a float16 ulp).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointReader, find_checkpoint
from ..formats.safetensors import SourceTensor
from ..hf import WeightLayout
from ..rowwise import dequantize_rows
from .fidelity import _where, kept_problems
from .layout import Layout
from .result import Check, Group, Thresholds, outcome

TOLERANCE = 1e-3
"""Slack on half a step for float32 arithmetic (the product by bitsandbytes' rounded reciprocal of 127)."""
THRESHOLD = "stock transformers + bitsandbytes (config.json's quantization_config): Linear8bitLt layers, no missing or unexpected keys"


def load(layout: Layout, dtype, device) -> tuple[Check, object | None]:
    """The ``load`` check, and the model to run (None when it did not load)."""
    import bitsandbytes as bnb

    from ..errors import first_line
    from ..hf import load_config, load_model
    from ..hf import model_class as model_class_for
    from .models import quiet

    try:
        with quiet():
            cls = model_class_for(load_config(layout.folder))
            model, info = load_model(cls, layout.folder, dtype=dtype, output_loading_info=True,
                                     device_map={"": str(device)})
    except Exception as e:  # transformers refusing the checkpoint is the finding
        return outcome("load", [f"transformers cannot load it: {type(e).__name__}: {first_line(e, 300)}"],
                       figure="does not load", threshold=THRESHOLD, group=Group.LOADING), None
    _widen(model, dtype)
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(key) or [])
        if keys:
            problems.append(f"{len(keys)} {key.replace('_', ' ')}: {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else ""))
    layers = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8}
    missing = sorted(set(layout.quantized) - layers)
    if missing:
        problems.append(f"transformers did not build int8 Linear8bitLt layers for {len(missing)} quantized layer(s): "
                        + ", ".join(missing[:5]))
    figure = f"{layout.model_class}, {len(layers)}/{len(layout.quantized)} Linear8bitLt int8 layers (bitsandbytes {bnb.__version__})"
    return outcome("load", problems, figure=figure, threshold=THRESHOLD, group=Group.LOADING), model.eval()


def _widen(model, dtype) -> None:
    """Every floating parameter and buffer in ``dtype`` (the int8 weights untouched).

    transformers 5.24 loads a pre-quantized bitsandbytes checkpoint with the kept ``*.weight`` tensors in
    their stored dtype whatever ``dtype`` asks, while biases follow ``dtype``: a bf16 checkpoint loaded with
    ``dtype=torch.float32`` then fails in its first LayerNorm (mixed dtypes)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)


def reconstruction(layout: Layout, original: Path, thresholds: Thresholds):
    """The ``reconstruction`` check (`int8.verify.fidelity.Reconstruction`, the as-loaded error being the
    error itself: stock bitsandbytes decodes exactly as this check does)."""
    from .fidelity import Reconstruction

    problems: list[str] = []
    worst = worst32 = 0.0
    kept_ok = 0
    with CheckpointReader(find_checkpoint(original)) as orig_reader, CheckpointReader(find_checkpoint(layout.folder)) as conv:
        by_name: dict[str, SourceTensor] = {}
        for t in orig_reader.tensors:
            by_name.setdefault(layout.model_name(t.name), t)
        aliases: dict[str, list[str]] = {}
        for copy, source in layout.tied.items():
            aliases.setdefault(source, []).append(copy)
            aliases.setdefault(copy, []).append(source)

        def find(name: str) -> SourceTensor | None:
            return next((by_name[c] for c in (name, *aliases.get(name, ())) if c in by_name), None)

        stored = {t.name: t for t in conv.tensors}
        for q in layout.quantized.values():
            src = find(f"{q.module}.weight")
            conv1d = q.layout == WeightLayout.CONV1D
            want = (q.in_features, q.out_features) if conv1d else (q.out_features, q.in_features)
            if src is None or tuple(src.shape) != want:
                problems.append(f"{_where(q.packed)}: the original has no weight {q.module}.weight of shape {list(want)} "
                                "to compare with")
                continue
            w = orig_reader.read(src).float()
            w = w.t() if conv1d else w
            w16 = w.to(torch.float16).float()
            codes, scb = conv.read(stored[q.packed.name]), conv.read(stored[q.scale.name]).float()
            step = scb / 127
            safe = torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(1)
            decoded = dequantize_rows(codes, scb)
            err = ((w16 - decoded).abs() / safe).amax().item()
            err32 = ((w - decoded).abs() / safe).amax().item()
            worst, worst32 = max(worst, err), max(worst32, err32)
            absmax = w16.abs().amax(dim=1)
            off = absmax != scb
            if off.any():
                r = int(off.nonzero()[0])
                problems.append(
                    f"{_where(q.scale)}: {int(off.sum())} row scale(s) not the absmax of the float16 row (first row {r}: "
                    f"{float(scb[r]):.6g}, the original's absmax {float(absmax[r]):.6g})"
                )
            if err > 0.5 + TOLERANCE:
                e = ((w16 - decoded).abs() / safe)
                r, c = (int(i) for i in (e > 0.5 + TOLERANCE).nonzero()[0])
                problems.append(
                    f"{_where(q.packed)}: {int((e > 0.5 + TOLERANCE).sum())} value(s) beyond half a row step of the "
                    f"original (worst {err:.3f} steps; first at row {r}, column {c})"
                )
        ok, found = kept_problems(layout, find, orig_reader, conv, stored)
        kept_ok += ok
        problems += found
    figure = (
        f"max |w16 - q*SCB/127| = {worst:.3f} row step over {len(layout.quantized)} layers ({worst32:.3f} from the "
        f"float32 original, with the float16 cast); SCB the float16 absmax; {kept_ok}/{len(layout.kept)} other tensors identical"
    )
    threshold = "<= 0.5 row step (SCB/127) of the float16 original, as bitsandbytes decodes; SCB = absmax; the rest equal"
    check = outcome("reconstruction", problems, figure=figure, threshold=threshold, group=Group.FIDELITY, value=worst)
    return Reconstruction(check, worst)


def dequantize_layers(model, dtype) -> int:
    """Replace every int8 ``Linear8bitLt`` of a stock-loaded model by an ``nn.Linear`` holding its weight as
    bitsandbytes decodes it (``q * SCB * (1/127)``, `int8.rowwise.dequantize_rows`), in ``dtype``; how many."""
    import bitsandbytes as bnb

    n = 0
    for name, m in list(model.named_modules()):
        if not isinstance(m, bnb.nn.Linear8bitLt) or m.weight.dtype != torch.int8:
            continue
        scb = getattr(m.weight, "SCB", None)
        if scb is None:
            scb = m.state.SCB
        dense = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(dequantize_rows(m.weight.data, scb, dtype))
            if m.bias is not None:
                dense.bias.copy_(m.bias.to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
        n += 1
    return n


def loading_phase(layout: Layout, wins: list, logprobs: tuple, run):
    """The load and forward checks on the model as stock transformers + bitsandbytes builds it, and the
    agreement with the original of its weights as stored (de-quantized, `dequantize_layers`).

    The forward check runs ``Linear8bitLt`` itself (LLM.int8: int8 activations per token, outliers beyond
    the threshold in float16) on the first window, and its figure gives that run's KL from the original:
    the run-time error of LLM.int8 comes on top of the checkpoint's and is no property of the file. The
    fidelity checks (top-1, KL, perplexity, against the reference's weight noise) measure the checkpoint:
    they run its de-quantized weights, as the compressed-tensors path does on CPU."""
    from . import models
    from .fidelity import Agreement
    from .phases import LoadingPhase, forward_failed
    from .result import skipped

    converted = Agreement()
    load_check, model = load(layout, run.dtype, run.device)
    if model is None:
        return LoadingPhase((load_check, skipped("forward", "the model did not load", group=Group.LOADING)), converted)
    why = ""
    try:
        first = wins[:1]
        runtime = Agreement()
        bad = []
        for w, lp, (lg, is_logits) in zip(first, logprobs[:1] or [None] * len(first), models.outputs(model, first, run.device),
                                          strict=True):
            n_bad = int((~torch.isfinite(lg)).sum())
            if n_bad:
                bad.append(f"window 0: {n_bad} of {lg.numel()} {'logits' if is_logits else 'outputs'} are NaN or infinite")
            if lp is not None and is_logits:
                runtime.update(lp, lg, w.targets)
        if not first:
            forward = skipped("forward", "no tokenizer loads, so there is no text to run", group=Group.LOADING)
        else:
            kl = f"; LLM.int8 at run time: KL {runtime.mean_kl:.3g} nats/token from the original" if runtime.tokens else ""
            forward = outcome("forward", bad, figure=f"{sum(w.tokens for w in first)} tokens through Linear8bitLt{kl}",
                              threshold="finite outputs", group=Group.LOADING)
        if logprobs and not bad:
            dequantize_layers(model, run.dtype)
            for i, (w, (lg, is_logits)) in enumerate(zip(wins, models.outputs(model, wins, run.device), strict=True)):
                if is_logits:
                    converted.update(logprobs[i], lg, w.targets)
    except Exception as e:  # a model that loads but cannot run is the finding
        forward = forward_failed(e)
        if logprobs:
            why = "the converted model does not run"
    finally:
        models.free(model)
        model = None
    return LoadingPhase((load_check, forward), converted, why)
