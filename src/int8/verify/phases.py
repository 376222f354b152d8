"""The model-level phases of `int8 verify`, each a function returning its checks and figures.

1. the original phase: the tensors against the original's (``reconstruction``),
   its tokenizer and config, then the original's and the reference's
   predictions on the sample;
2. the loading phase: the converted model loaded as its users will load it
   (``load``), and run (``forward``), its predictions compared with the original's;
3. the fidelity phase: ``top1``, ``kl`` and ``perplexity`` from those comparisons.

Only one model is in memory at a time. Within a memory budget that cannot hold
a model whole (`int8.verify.budget`), phases 1 and 2 run layer by layer instead
(`_streamed`, `int8.verify.stream`), with the same checks and figures. Whether an
unusable original is an error or a finding is decided once, in `Against`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Int8Error, first_line
from .result import SKIP, Check, Group, Thresholds, outcome, skipped
from .target import Original

if TYPE_CHECKING:
    from .fidelity import Agreement
    from .layout import Layout
    from .models import LoadMode

FIDELITY_CHECKS = ("original", "reconstruction", "same_tokenizer", "same_config", "top1", "kl", "perplexity")
MODEL_LEVEL = ("top1", "kl", "perplexity")
NO_ORIGINAL_HINT = "pass --against SOURCE (the preset, Hub id or folder it was converted from), or --quick for structure only"


@dataclass(frozen=True)
class Against:
    """The original to compare with, and what an unusable one is.

    One the user named (``against``) that proves unusable is an error for the
    caller to fix; the recorded one, a finding (the ``original`` check fails)."""

    original: Original
    named: bool

    def unusable(self, error: Int8Error, why: str) -> str:
        """``why`` the original cannot be compared with; raises ``error`` instead when the user named it."""
        if self.named:
            raise error from None
        return why


@dataclass(frozen=True)
class Run:
    """How the models are run: where, in what dtype, held to what, telling whom."""

    device: Any
    dtype: Any
    thresholds: Thresholds
    say: Callable[[str], None]
    bar: Callable[[str], Any] | None = None  # a progress bar for the layer-by-layer run (`int8.verify.stream`)


@dataclass(frozen=True)
class OriginalPhase:
    """The original and the reference run: their checks, and what the converted model is compared with."""

    checks: tuple[Check, ...]  # original, and when there is one: reconstruction, same_tokenizer, same_config
    why: str  # why the model-level fidelity checks cannot run ("": they can)
    logprobs: tuple[Any, ...]  # the original's log-probabilities, window by window
    references: tuple[Agreement, ...]  # one per noise draw of the reference
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadingPhase:
    """The converted model loaded and run: the load and forward checks, its agreement with the original."""

    checks: tuple[Check, ...]
    converted: Agreement
    why: str = ""  # set when the converted model raised while the original's predictions wait for it


def model_checks(
    layout: Layout, against: Against, text: str, device, thresholds: Thresholds, max_tokens: int, say: Callable[[str], None],
    budget: tuple[int, int | None] | None = None, bar: Callable[[str], Any] | None = None,
) -> tuple[list[Check], dict]:
    """Loading, forward pass and fidelity; the original first, then the converted model, never both at once.

    ``budget`` is (CPU bytes, GPU bytes or None) as `int8.verify.budget.check_budget` gives them (None: unbounded,
    the whole-model run); a model that does not fit whole runs layer by layer (`int8.verify.stream`)."""
    from . import models

    run = Run(device, models.compute_dtype(device, layout), thresholds, say, bar)
    mode = models.load_mode(layout)
    unusable = _unusable(against)
    # The sample is tokenized with the original's tokenizer: the converted one is what is checked.
    converted_tok = _tokenizer(layout.folder)
    original_tok = None if unusable else _tokenizer(against.original.folder)
    wins = _windows(layout, original_tok or converted_tok, text, max_tokens)
    memory: dict[str, float] = {}
    if budget is not None:
        from .budget import Mode

        chosen, skeleton, split = _plan(layout, wins, budget)
        memory = chosen.metrics
        if chosen.mode is Mode.STREAMED:
            say(f"Running layer by layer within {_gb(chosen.budget)} (about {_gb(chosen.needed)} needed)")
            original, loading = _streamed(layout, against, unusable, (original_tok, converted_tok), text, wins, run,
                                          skeleton, split, mode)
            fidelity, found = _fidelity_phase(original, loading, thresholds)
            metrics = {"sample_tokens": sum(w.tokens for w in wins), **original.metrics, **found, **memory}
            return [*loading.checks, *fidelity], metrics
        models.free(skeleton)
    original = _original_phase(layout, against, unusable, (original_tok, converted_tok), text, wins, run)
    say(f"Loading the converted model ({'bitsandbytes Linear8bitLt' if layout.bnb else mode.value})")
    loading = (_bnb_loading_phase if layout.bnb else _loading_phase)(layout, mode, wins, original.logprobs, run)
    fidelity, found = _fidelity_phase(original, loading, thresholds)
    metrics = {"sample_tokens": sum(w.tokens for w in wins), **original.metrics, **found, **memory}
    return [*loading.checks, *fidelity], metrics


def _gb(n: int) -> str:
    from .budget import size_text

    return size_text(n)


def _plan(layout: Layout, wins: list, budget: tuple[int, int | None]):
    """(plan, the meta skeleton, its split or None) for the model-level run within ``budget``."""
    from ..hf import split_of
    from . import budget as b
    from . import models
    from .stream import stage_bytes

    skeleton = models.build_skeleton(layout)
    config = skeleton.config
    fp32 = sum(p.numel() for p in skeleton.parameters()) * 4
    # Layer by layer decodes compressed-tensors' linear layers; bitsandbytes rows and quantized embeddings run whole.
    split = None if layout.bnb or layout.embeddings else split_of(config)
    tokens = sum(w.tokens for w in wins) or 1
    window = max((max(v.shape[-1] for v in w.inputs.values()) for w in wins), default=1)
    acts = b.activation_bytes(tokens, window, int(getattr(config, "hidden_size", 0) or 0),
                              int(getattr(config, "num_attention_heads", 0) or 0), int(getattr(config, "vocab_size", 0) or 0))
    streamed = None if split is None else b.streamed_bytes(stage_bytes(skeleton, split), acts)
    return b.plan(budget[0], b.whole_bytes(fp32, acts), streamed, budget[1]), skeleton, split


def _tensor_checks(layout: Layout, against: Against, unusable: str, tokenizers, text: str, wins: list, run: Run):
    """(checks, unusable, why, metrics): the tensors against the original's, its tokenizer and config."""
    from .fidelity import check_same_config, check_same_tokenizer

    original = against.original
    checks: list[Check] = []
    why = ""
    metrics: dict[str, float] = {}
    if not unusable:
        run.say(f"Comparing tensors with the original ({original.id})")
        try:
            rec = _reconstruction(layout)(layout, original.folder, run.thresholds)
            checks.append(rec.check)
            metrics["max_error_scales_as_loaded"] = rec.max_error_as_loaded
        except Int8Error as e:
            unusable = against.unusable(e, f"the original {original.id} cannot be read ({e.message})")
    if not unusable:
        checks.append(check_same_tokenizer(*tokenizers, text))
        checks.append(check_same_config(original.folder, layout.folder))
        if not wins:
            why = "no tokenizer loads, so there is no text to run"
    return checks, unusable, why, metrics


def _streamed(layout: Layout, against: Against, unusable: str, tokenizers, text: str, wins: list, run: Run, skeleton,
              split, mode) -> tuple[OriginalPhase, LoadingPhase]:
    """The original and loading phases layer by layer: the same checks and figures, in memory flat in model size.

    The loading check builds the model on the meta device (keys only, no weight read); the fidelity run is
    `int8.verify.stream`'s."""
    import torch

    from . import models, stream
    from .fidelity import Agreement

    original = against.original
    checks, unusable, why, metrics = _tensor_checks(layout, against, unusable, tokenizers, text, wins, run)
    load_check, loaded = _load(layout, mode, run.dtype, torch.device("meta"))
    if loaded is not None:
        models.free(loaded)
        load_check = _keys_only(load_check)
    converted = Agreement()
    references: tuple = ()
    failed = ""
    if loaded is None:
        forward = skipped("forward", "the model did not load", group=Group.LOADING)
    elif not wins:
        forward = skipped("forward", "no tokenizer loads, so there is no text to run", group=Group.LOADING)
    else:
        folder = None if unusable or why else original.folder
        shown = wins if folder is not None else wins[:1]
        run.say("Running the original, the reference and the converted model layer by layer" if folder is not None
                else "Running the converted model layer by layer")
        figures = None
        try:
            figures = stream.run(layout, split, skeleton, folder, shown, run.dtype, run.device,
                                 run.bar("layers") if run.bar else None)
        except stream.OriginalMismatch as e:
            error = Int8Error(f"--against {original.id}: it is not this model's original ({e})")
            unusable = against.unusable(error, f"the original {original.id} does not fit this model ({e})")
            try:
                figures = stream.run(layout, split, skeleton, None, wins[:1], run.dtype, run.device, None)
            except Exception as e2:  # a model that cannot run is the finding
                failed = forward_raised(e2)
        except Exception as e:  # a model that cannot run is the finding
            failed = forward_raised(e)
        finally:
            models.free(skeleton)
        if figures is not None:
            forward = outcome("forward", list(figures.bad_windows), threshold="finite outputs", group=Group.LOADING,
                              figure=f"{sum(w.tokens for w in shown)} tokens in {len(shown)} window(s), layer by layer")
            if folder is not None and not unusable:
                converted, references = figures.converted, figures.references
        else:
            forward = outcome("forward", [failed], figure="raised", threshold="finite outputs", group=Group.LOADING)
    if unusable:
        phase = OriginalPhase((_original_check(original, unusable),), "no original to compare with", (), (), metrics)
    else:
        phase = OriginalPhase((_original_check(original, ""), *checks), why, (), references, metrics)
    return phase, LoadingPhase((load_check, forward), converted, "the converted model does not run" if failed else "")


def _keys_only(check: Check) -> Check:
    """The loading check as made on the meta device: the same verdict, the figure says no weight was read."""
    from dataclasses import replace

    return replace(check, figure=f"{check.figure}; keys on the meta device (layer-by-layer run)")


def _unusable(against: Against) -> str:
    """Why the original cannot be compared with ("" when it may be)."""
    original = against.original
    if original.folder is None:
        return original.why
    if _is_quantized(original.folder):
        error = Int8Error(
            f"--against {original.id} is itself a quantized checkpoint",
            "Compare with the full-precision original the checkpoint was converted from.",
        )
        return against.unusable(error, f"the recorded original {original.id} is itself quantized")
    return ""


def _windows(layout: Layout, tokenizer, text: str, max_tokens: int) -> list:
    """The sample text cut into the windows both models run (none when no tokenizer loads)."""
    from ..hf import load_config
    from . import models
    from .sample import tokenize, windows

    with models.quiet():
        config = load_config(layout.folder)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if tokenizer is None:
        return []
    tokens = tokenize(tokenizer, text, min(max_tokens, models.token_cap(vocab)), seq2seq=layout.seq2seq)
    span = models.max_positions(config) or 1024
    window = min(span, 512 if layout.seq2seq else 1024)
    start = getattr(config, "decoder_start_token_id", None)
    return windows(tokens, seq2seq=layout.seq2seq, window=window, decoder_start=start)


def _original_phase(layout: Layout, against: Against, unusable: str, tokenizers, text: str, wins: list, run: Run) -> OriginalPhase:
    """The tensors against the original's; then the original's and the reference's predictions on the sample."""
    import torch

    from . import models
    from .fidelity import Agreement

    original = against.original
    logprobs: list = []
    references: list[Agreement] = []
    checks, unusable, why, metrics = _tensor_checks(layout, against, unusable, tokenizers, text, wins, run)
    if not unusable and not why:
        run.say("Running the original")
        try:
            model = models.load_original(original.folder, run.dtype, run.device)
        except Exception as e:  # an original transformers cannot load cannot be compared with
            error = Int8Error(f"--against {original.id}: transformers cannot load it ({first_line(e, 300)})")
            unusable = against.unusable(error, f"transformers cannot load the original {original.id} ({first_line(e, 300)})")
        else:
            try:
                for lg in models.logits(model, wins, run.device):
                    logprobs.append(torch.log_softmax(lg, dim=-1))
                ref = models.Reference(model, layout)
                if ref.unmatched:
                    metrics["reference_unmatched"] = len(ref.unmatched)
                for i, seed in enumerate(models.NOISE_SEEDS):
                    run.say(f"Running the reference (the original with ideal int8 rounding noise, draw {i + 1} of "
                            f"{len(models.NOISE_SEEDS)})")
                    ref.draw(seed)
                    draw = Agreement()
                    for w, lp, lg in zip(wins, logprobs, models.logits(model, wins, run.device), strict=True):
                        draw.update(lp, lg, w.targets)
                    references.append(draw)
            except models.NotALanguageModel as e:
                logprobs.clear()
                why = f"{e}: only its tensors are compared"
            finally:
                models.free(model)
                model = None
    if unusable:
        return OriginalPhase((_original_check(original, unusable),), "no original to compare with", (), (), metrics)
    return OriginalPhase((_original_check(original, ""), *checks), why, tuple(logprobs), tuple(references), metrics)


def _loading_phase(layout: Layout, mode, wins: list, logprobs: tuple, run: Run) -> LoadingPhase:
    """Load the converted model as its users will, run it on the sample, compare its predictions with the original's."""
    import torch

    from . import models
    from .fidelity import Agreement

    converted = Agreement()
    load_check, model = _load(layout, mode, run.dtype, run.device)
    if model is None:
        return LoadingPhase((load_check, skipped("forward", "the model did not load", group=Group.LOADING)), converted)
    why = ""
    try:
        shown = wins if logprobs else wins[:1]
        bad = []
        for i, (w, (lg, is_logits)) in enumerate(zip(shown, models.outputs(model, shown, run.device), strict=True)):
            n_bad = int((~torch.isfinite(lg)).sum())
            what = "logits" if is_logits else "outputs"
            if n_bad:
                bad.append(f"window {i}: {n_bad} of {lg.numel()} {what} are NaN or infinite")
            if logprobs and is_logits:
                converted.update(logprobs[i], lg, w.targets)
        if not shown:
            forward = skipped("forward", "no tokenizer loads, so there is no text to run", group=Group.LOADING)
        else:
            forward = outcome("forward", bad, figure=f"{sum(w.tokens for w in shown)} tokens in {len(shown)} window(s)",
                              threshold="finite outputs", group=Group.LOADING)
    except Exception as e:  # a model that loads but cannot run is the finding
        forward = forward_failed(e)
        if logprobs:
            why = "the converted model does not run"
    finally:
        models.free(model)
        model = None
    return LoadingPhase((load_check, forward), converted, why)


def _fidelity_phase(original: OriginalPhase, loading: LoadingPhase, thresholds: Thresholds) -> tuple[list[Check], dict]:
    """The fidelity checks in order: those of the original phase, then top-1, KL and perplexity (or why not)."""
    from .fidelity import metric_checks

    fidelity = list(original.checks)
    metrics: dict[str, float] = {}
    why = original.why or loading.why
    converted = loading.converted
    if why:
        done = {c.name for c in fidelity}
        fidelity += [skipped(n, why, group=Group.FIDELITY) for n in FIDELITY_CHECKS if n not in done]
    elif not converted.tokens and not converted.vocab_mismatch:
        fidelity += [skipped(n, "the converted model did not run", group=Group.FIDELITY) for n in MODEL_LEVEL]
    else:
        more, found = metric_checks(converted, original.references, thresholds)
        fidelity += more
        metrics.update(found)
    rec = next((c for c in fidelity if c.name == "reconstruction" and c.status is not SKIP), None)
    if rec is not None and rec.value is not None:
        metrics["max_error_scales"] = rec.value
    return fidelity, metrics


def _tokenizer(folder: Path | None):
    """The folder's tokenizer, or None when none loads (the tokenizer checks say why)."""
    from ..hf import load_tokenizer
    from . import models

    if folder is None:
        return None
    try:
        with models.quiet():
            return load_tokenizer(folder)
    except Exception:  # the tokenizer check has already said why
        return None


def _original_check(original: Original, unusable: str) -> Check:
    """Whether there is an original to compare with: a full verify passes only when fidelity could run."""
    threshold = "the full-precision original is found and readable"
    if unusable:
        return outcome("original", [f"fidelity was not checked: {unusable}; {NO_ORIGINAL_HINT}"],
                       figure="not found", threshold=threshold, group=Group.FIDELITY)
    return outcome("original", [], figure=str(original.id), threshold=threshold, group=Group.FIDELITY)


def _load(layout: Layout, mode: LoadMode, dtype, device) -> tuple[Check, object | None]:
    """The loading check, and the model to run (None when it did not load)."""
    from . import models

    cls = layout.model_class
    n = len(layout.quantized)
    threshold = "stock transformers + compressed-tensors, no missing or unexpected keys"
    if mode is models.LoadMode.INT8:
        try:
            model, missing = models.build_dequantized(layout, dtype, device)
        except Exception as e:  # cannot be built: a finding, reported as such
            return outcome("load", [f"int8 cannot build {cls} from this folder: {first_line(e, 300)}"],
                           figure="does not build", threshold=threshold, group=Group.LOADING), None
        why = (
            "GPT-2 style Conv1D layers: compressed-tensors loads only nn.Linear (run with int8.load); "
            "fidelity runs int8's own de-quantized build"
        )
        check = Check("load", True, figure=f"not applicable: {why}", threshold=threshold, group=Group.LOADING,
                      status=SKIP, detail=why)
        if missing:
            check = outcome("load", [f"the checkpoint does not fill {', '.join(missing[:5])}"],
                            figure="incomplete", threshold=threshold, group=Group.LOADING)
        return check, model
    if mode is models.LoadMode.INT8_LOAD:
        return _load_int8(layout, dtype, device)
    try:
        model, info = models.load_converted(layout.folder, mode, dtype, device)
    except Exception as e:  # transformers refusing the checkpoint is the finding
        return outcome("load", [f"transformers cannot load it: {type(e).__name__}: {first_line(e, 300)}"],
                       figure="does not load", threshold=threshold, group=Group.LOADING), None
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(key) or [])
        if keys:
            problems.append(f"{len(keys)} {key.replace('_', ' ')}: {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else ""))
    if mode is models.LoadMode.COMPRESSED:
        packed = {name for name, m in model.named_modules() if hasattr(m, "weight_packed")}
        missing = sorted(set(layout.quantized) - packed)
        if missing:
            problems.append(f"compressed-tensors did not take over {len(missing)} quantized layer(s): {', '.join(missing[:5])}")
        figure = f"{cls}, run-compressed: {len(packed)}/{n} int8 layers"
    else:
        figure = f"{cls}, de-quantized at load (transformers cannot run {layout.model_type} run-compressed)"
    return outcome("load", problems, figure=figure, threshold=threshold, group=Group.LOADING), model


def _load_int8(layout: Layout, dtype, device) -> tuple[Check, object | None]:
    """The loading check of a checkpoint with quantized embeddings, which `int8.load` runs (stock transformers
    only de-quantized at load, with one block size; vLLM not at all: `EMBEDDING_LOADERS`)."""
    from ..formats.compressed_tensors import EMBEDDING_LOADERS
    from . import models

    threshold = "int8.load (quantized embeddings: stock transformers runs them only de-quantized), every int8 layer filled"
    try:
        model = models.load_int8(layout.folder, dtype, device)
    except Exception as e:  # int8.load refusing the checkpoint is the finding
        return outcome("load", [f"int8.load cannot load it: {type(e).__name__}: {first_line(e, 300)}"],
                       figure="does not load", threshold=threshold, group=Group.LOADING), None
    figure = (f"{layout.model_class}, int8.load: {len(layout.quantized)} int8 layers, embeddings "
              f"{', '.join(layout.embeddings)}; transformers: {EMBEDDING_LOADERS['transformers']}; vLLM: {EMBEDDING_LOADERS['vLLM']}")
    return outcome("load", [], figure=figure, threshold=threshold, group=Group.LOADING), model


def _reconstruction(layout: Layout):
    """The reconstruction check of the layout (bitsandbytes' rows: `int8.verify.bnb_fidelity`)."""
    from .bnb_fidelity import reconstruction as rows
    from .fidelity import reconstruction as blocks

    return rows if layout.bnb else blocks


def _bnb_loading_phase(layout: Layout, mode, wins: list, logprobs: tuple, run: Run) -> LoadingPhase:
    """bitsandbytes' layout: loaded into Linear8bitLt, measured de-quantized (`int8.verify.bnb_fidelity`)."""
    from .bnb_fidelity import loading_phase

    return loading_phase(layout, wins, logprobs, run)


def _is_quantized(folder: Path | None) -> bool:
    from ..hf import read_json_object

    try:
        return "quantization_config" in read_json_object(Path(folder) / "config.json")
    except Int8Error:  # no readable config: not a quantized checkpoint that could be mistaken for an original
        return False


def forward_raised(e: BaseException) -> str:
    """What the forward check says of a model that loads but raises when run."""
    return f"the forward pass raised {type(e).__name__}: {first_line(e, 300)}"


def forward_failed(e: BaseException) -> Check:
    """The forward check of a model whose forward pass raised ``e`` (a model that cannot run is the finding)."""
    return outcome("forward", [forward_raised(e)], figure="raised", threshold="finite outputs", group=Group.LOADING)
