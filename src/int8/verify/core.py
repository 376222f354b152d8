"""`verify_checkpoint`: the checks of `int8 verify`, in order, each phase only when it can mean something."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import Int8Error, SourceNotFound
from .result import SKIP, Check, Thresholds, VerifyResult, manifest_digest, outcome, skipped
from .sample import MAX_TOKENS
from .target import Original, resolve_original, resolve_target

if TYPE_CHECKING:
    from .structure import Layout

# torch and transformers are imported only once the target is known to exist:
# a mistyped path is reported at once.

MODEL_CHECKS = (("load", "loading"), ("forward", "loading"))
FIDELITY_CHECKS = ("original", "reconstruction", "same_tokenizer", "same_config", "top1", "kl", "perplexity")
MODEL_LEVEL = ("top1", "kl", "perplexity")
NO_ORIGINAL_HINT = "pass --against SOURCE (the preset, Hub id or folder it was converted from), or --quick for structure only"
LOAD_MODES = {"compressed": "run-compressed", "dequantized": "de-quantized at load", "int8": "int8's de-quantized build"}


def verify_checkpoint(
    target: str | os.PathLike,
    *,
    against: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    quick: bool = False,
    device: str = "auto",
    revision: str | None = None,
    token: str | bool | None = None,
    thresholds: Thresholds | None = None,
    max_tokens: int = MAX_TOKENS,
    save: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Check that a converted checkpoint is whole and faithful; return every check's outcome.

    ``target`` is a folder written by `int8 convert` or a Hub repo id (at
    ``revision``). ``quick=True`` runs the structure and integrity checks only
    (no model is built; the time is that of reading the files once).
    Otherwise stock transformers loads the checkpoint and runs it, and the
    fidelity checks compare it with ``against`` (a preset, Hub id or folder;
    by default the source recorded in the conversion report) on ``text``: a
    ``str`` is the sample itself, a `pathlib.Path` a UTF-8 file to read; the
    built-in sample by default.

    A full run passes only when fidelity ran: when no original can be found
    (none named, and the recorded one is not beside the folder, not reachable,
    or itself quantized) the ``original`` check fails with the reason and the
    hint (``against``, or ``quick=True`` for structure only).

    A failed check is a result (``result.passed`` is false), not an
    exception; `int8.errors.Int8Error` is raised for what the caller must
    fix: a target or ``against`` that does not exist or cannot be
    downloaded, an unreadable ``text`` file, an unusable ``device``.

    ``save`` writes the result to ``int8_verify.json`` in the verified folder
    (default: when the target is a local folder and the run is not quick, so
    a quick run never replaces the figures of a full one).
    """
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    thresholds = thresholds or Thresholds()
    sample = _sample_text(text)
    tgt = resolve_target(target, revision, token)

    from ..hf import resolve_device
    from .structure import BLOCKING, check_structure

    dev = resolve_device(device)
    if not any((tgt.folder / n).exists() for n in ("config.json", "int8_report.json", "model.safetensors.index.json")):
        raise SourceNotFound(
            f"{tgt.id} is not a converted checkpoint: it has no config.json, int8_report.json or shard index",
            "Give the folder that `int8 convert` wrote, or the repo it was pushed to.",
        )

    say("Checking structure and integrity")
    checks, layout = check_structure(tgt.folder)
    metrics: dict[str, float] = {
        "bytes_checked": layout.bytes_checked,
        "scan_seconds": round(layout.scan_seconds, 4),
        "structure_seconds": round(layout.seconds, 3),
        "throughput_gb_s": round(layout.bytes_checked / layout.scan_seconds / 1e9, 3) if layout.scan_seconds else 0.0,
    }
    against_id = None
    if not quick:
        blocked = [c.name for c in checks if c.failed and c.name in BLOCKING]
        if blocked:
            why = f"the {', '.join(blocked)} check(s) failed"
            checks += [skipped(n, why, group=g) for n, g in MODEL_CHECKS]
            checks += [skipped(n, why, group="fidelity") for n in FIDELITY_CHECKS]
        else:
            say("Finding the original")
            original = resolve_original(tgt.folder, against, token, local=tgt.kind == "local")
            against_id = original.id if original.folder is not None else None
            more, found = _model_checks(layout, original, sample, dev, thresholds, max_tokens, say,
                                        explicit=against is not None)
            checks += more
            metrics.update(found)

    result = VerifyResult(
        target=tgt.id,
        checks=checks,
        quick=quick,
        against=against_id,
        revision=tgt.revision,
        commit=tgt.commit,
        device=str(dev),
        seconds=time.perf_counter() - started,
        thresholds=thresholds,
        metrics=metrics,
        folder=tgt.folder,
        manifest_sha256=manifest_digest(layout.report.files) if layout.report is not None else None,
    )
    asked = save
    if save is None:
        save = tgt.kind == "local" and not quick
    if save:
        if tgt.kind != "local":
            raise Int8Error("the result is saved into local folders only; this target is a Hub repo")
        try:
            result.save(tgt.folder)
        except OSError as e:
            if asked:  # asked for explicitly (--update-card): the caller must know
                raise Int8Error(f"cannot write {tgt.folder}/int8_verify.json: {e.strerror}") from None
            # by default the record is a convenience: a read-only folder is still verified
    return result


def _sample_text(text: str | os.PathLike | None) -> str:
    from .sample import DEFAULT_TEXT

    if text is None:
        return DEFAULT_TEXT
    if isinstance(text, os.PathLike):
        path = Path(text)
        try:
            value = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SourceNotFound(f"--text {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise Int8Error(f"--text {path} cannot be read as UTF-8 text ({e})") from None
    else:
        value = str(text)
    if not value.strip():
        raise Int8Error("the sample text is empty", "Give a file with a few paragraphs of text.")
    return value


def _model_checks(
    layout: Layout,
    original: Original,
    text: str,
    device,
    thresholds: Thresholds,
    max_tokens: int,
    say: Callable[[str], None],
    explicit: bool,
) -> tuple[list[Check], dict]:
    """Loading, forward pass and fidelity; the original first, then the converted model, never both at once."""
    import torch

    from . import models
    from .fidelity import Agreement, check_reconstruction, check_same_config, check_same_tokenizer, metric_checks
    from .sample import tokenize, windows

    checks: list[Check] = []
    metrics: dict = {}
    dtype = models.compute_dtype(device, layout)
    mode = models.load_mode(layout)

    unusable = original.why if original.folder is None else ""
    if not unusable and _is_quantized(original.folder):
        if explicit:
            raise Int8Error(
                f"--against {original.id} is itself a quantized checkpoint",
                "Compare with the full-precision original the checkpoint was converted from.",
            )
        unusable = f"the recorded original {original.id} is itself quantized"

    # The sample is tokenized with the original's tokenizer: the converted one is what is checked.
    converted_tok, original_tok = _tokenizer(layout.folder), None
    if not unusable:
        original_tok = _tokenizer(original.folder)
    tokenizer = original_tok or converted_tok
    from ..hf import load_config

    with models.quiet():
        config = load_config(layout.folder)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    ids = tokenize(tokenizer, text, min(max_tokens, models.token_cap(vocab))) if tokenizer is not None else []
    seq2seq = layout.seq2seq
    span = models.max_positions(config) or 1024
    window = min(span, 512 if seq2seq else 1024)
    start = getattr(config, "decoder_start_token_id", None)
    wins = windows(ids, seq2seq=seq2seq, window=window, decoder_start=start) if len(ids) >= 4 else []
    metrics["sample_tokens"] = sum(w.tokens for w in wins)

    fidelity_why = ""
    original_lp: list[torch.Tensor] = []
    reference = Agreement()
    fidelity: list[Check] = []
    if not unusable:
        say(f"Comparing tensors with the original ({original.id})")
        try:
            fidelity.append(check_reconstruction(layout, original.folder, thresholds))
        except Int8Error as e:
            if explicit:
                raise
            unusable = f"the original {original.id} cannot be read ({e.message})"
    if not unusable:
        fidelity.append(check_same_tokenizer(original_tok, converted_tok, text))
        fidelity.append(check_same_config(original.folder, layout.folder))
        if not wins:
            fidelity_why = "no tokenizer loads, so there is no text to run"
    if not unusable and not fidelity_why:
        say("Running the original")
        try:
            model = models.load_original(original.folder, dtype, device)
        except Exception as e:  # an original transformers cannot load cannot be compared with
            if explicit:
                raise Int8Error(f"--against {original.id}: transformers cannot load it ({_first_line(e)})") from None
            unusable = f"transformers cannot load the original {original.id} ({_first_line(e)})"
        else:
            try:
                for lg in models.logits(model, wins, device):
                    original_lp.append(torch.log_softmax(lg, dim=-1))
                say("Running the reference (the original with ideal int8 rounding noise)")
                unmatched = models.to_reference(model, layout)
                if unmatched:
                    metrics["reference_unmatched"] = len(unmatched)
                for w, lp, lg in zip(wins, original_lp, models.logits(model, wins, device), strict=True):
                    reference.update(lp, lg, w.targets)
            except models.NotALanguageModel as e:
                original_lp.clear()
                fidelity_why = f"{e}: only its tensors are compared"
            finally:
                models.free(model)
                model = None
    if unusable:
        fidelity = [_original_check(original, unusable)]
        fidelity_why = "no original to compare with"
    else:
        fidelity.insert(0, _original_check(original, ""))

    say(f"Loading the converted model ({LOAD_MODES[mode]})")
    converted = Agreement()
    load_check, model = _load(layout, mode, dtype, device)
    checks.append(load_check)
    if model is None:
        checks.append(skipped("forward", "the model did not load", group="loading"))
    else:
        try:
            run = wins if original_lp else wins[:1]
            bad, seen = [], 0
            for i, (w, (lg, is_logits)) in enumerate(zip(run, models.outputs(model, run, device), strict=True)):
                seen += lg.numel()
                n_bad = int((~torch.isfinite(lg)).sum())
                what = "logits" if is_logits else "outputs"
                if n_bad:
                    bad.append(f"window {i}: {n_bad} of {lg.numel()} {what} are NaN or infinite")
                if original_lp and is_logits:
                    converted.update(original_lp[i], lg, w.targets)
            if not run:
                checks.append(skipped("forward", "no tokenizer loads, so there is no text to run", group="loading"))
            else:
                checks.append(
                    outcome(
                        "forward",
                        bad,
                        figure=f"{sum(w.tokens for w in run)} tokens in {len(run)} window(s)",
                        threshold="finite outputs",
                        group="loading",
                    )
                )
        except Exception as e:  # a model that loads but cannot run is the finding
            checks.append(outcome("forward", [f"the forward pass raised {type(e).__name__}: {_first_line(e)}"],
                                  figure="raised", threshold="finite outputs", group="loading"))
            if original_lp:
                fidelity_why = fidelity_why or "the converted model does not run"
        finally:
            models.free(model)
            model = None

    if fidelity_why:
        done = {c.name for c in fidelity}
        fidelity += [skipped(n, fidelity_why, group="fidelity") for n in FIDELITY_CHECKS if n not in done]
    elif not converted.tokens and not converted.vocab_mismatch:
        fidelity += [skipped(n, "the converted model did not run", group="fidelity") for n in MODEL_LEVEL]
    else:
        more, found = metric_checks(converted, reference, thresholds)
        fidelity += more
        metrics.update(found)
    rec = next((c for c in fidelity if c.name == "reconstruction" and c.status != SKIP), None)
    if rec is not None and rec.value is not None:
        metrics["max_error_scales"] = rec.value
    return checks + fidelity, metrics


def _tokenizer(folder: Path | None):
    """The folder's tokenizer, or None when none loads (the tokenizer checks say why)."""
    from . import models
    from .structure import load_tokenizer

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
                       figure="not found", threshold=threshold, group="fidelity")
    return outcome("original", [], figure=str(original.id), threshold=threshold, group="fidelity")


def _load(layout: Layout, mode: str, dtype, device) -> tuple[Check, object | None]:
    """The loading check, and the model to run (None when it did not load)."""
    from . import models

    cls = layout.model_class
    n = len(layout.quantized)
    threshold = "stock transformers + compressed-tensors, no missing or unexpected keys"
    if mode == "int8":
        try:
            model, missing = models.build_dequantized(layout, dtype, device)
        except Exception as e:  # cannot be built: a finding, reported as such
            return outcome("load", [f"int8 cannot build {cls} from this folder: {_first_line(e)}"],
                           figure="does not build", threshold=threshold, group="loading"), None
        why = (
            "GPT-2 style Conv1D layers: compressed-tensors loads only nn.Linear (run with int8.load); "
            "fidelity runs int8's own de-quantized build"
        )
        check = Check("load", True, figure=f"not applicable: {why}", threshold=threshold, group="loading",
                      status=SKIP, detail=why)
        if missing:
            check = outcome("load", [f"the checkpoint does not fill {', '.join(missing[:5])}"],
                            figure="incomplete", threshold=threshold, group="loading")
        return check, model
    try:
        model, info = models.load_converted(layout.folder, mode, dtype, device)
    except Exception as e:  # transformers refusing the checkpoint is the finding
        return outcome("load", [f"transformers cannot load it: {type(e).__name__}: {_first_line(e)}"],
                       figure="does not load", threshold=threshold, group="loading"), None
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(key) or [])
        if keys:
            problems.append(f"{len(keys)} {key.replace('_', ' ')}: {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else ""))
    if mode == "compressed":
        packed = {name for name, m in model.named_modules() if hasattr(m, "weight_packed")}
        missing = sorted(set(layout.quantized) - packed)
        if missing:
            problems.append(f"compressed-tensors did not take over {len(missing)} quantized layer(s): {', '.join(missing[:5])}")
        figure = f"{cls}, run-compressed: {len(packed)}/{n} int8 layers"
    else:
        figure = f"{cls}, de-quantized at load (transformers cannot run {layout.model_type} run-compressed)"
    return outcome("load", problems, figure=figure, threshold=threshold, group="loading"), model


def _is_quantized(folder: Path | None) -> bool:
    import json

    try:
        return "quantization_config" in json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
