"""`verify_checkpoint`: the checks of `int8 verify`, in order, each phase only when it can mean something."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import Int8Error, SourceNotFound
from .result import Group, Thresholds, VerifyResult, manifest_digest, skipped
from .sample import MAX_TOKENS
from .target import resolve_original, resolve_target

# torch and transformers are imported only once the target is known to exist:
# a mistyped path is reported at once.

MODEL_CHECKS = ("load", "forward")


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
    max_memory: int | str | None = None,
    max_gpu_memory: int | str | None = None,
    bar: Callable[[str], object] | None = None,
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

    ``max_memory`` (bytes, or a size such as ``"8GB"``; default: the memory available) bounds the model-level
    checks: a model that does not fit whole runs a block at a time (`int8.verify.stream`), with the same
    figures; a budget too small for one layer, or larger than the machine's memory, raises
    `int8.errors.UsageError`. ``max_gpu_memory`` is the same for a CUDA device (default: what is free).
    ``bar(what)`` makes the progress bar of the layer-by-layer run (``start(stages, tokens)``,
    ``advance(stage)``, ``finish()``).

    ``save`` writes the result to ``int8_verify.json`` in the verified folder
    (default: when the target is a local folder and the run is not quick, so
    a quick run never replaces the figures of a full one).
    """
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    thresholds = thresholds or Thresholds()
    sample = _sample_text(text)

    from .budget import check_budget, check_gpu_budget, parse_budget

    cpu_budget = check_budget(parse_budget(max_memory))  # before any download
    gpu_wanted = parse_budget(max_gpu_memory, "--max-gpu-memory")
    tgt = resolve_target(target, revision, token)

    from ..hf import resolve_device
    from .phases import FIDELITY_CHECKS, Against, model_checks
    from .structure import check_structure

    dev = resolve_device(device)
    budget = None if quick else (cpu_budget, check_gpu_budget(gpu_wanted, dev))

    if not any((tgt.folder / n).exists() for n in ("config.json", "int8_report.json", "model.safetensors.index.json")):
        raise SourceNotFound(
            f"{tgt.id} is not a converted checkpoint: it has no config.json, int8_report.json or shard index",
            "Give the folder that `int8 convert` wrote, or the repo it was pushed to.",
        )

    say("Checking structure and integrity")
    from .bnb_structure import check_structure as check_bnb_structure
    from .bnb_structure import is_bnb

    structure = (check_bnb_structure if is_bnb(tgt.folder) else check_structure)(tgt.folder)
    layout = structure.layout
    checks = list(structure.checks)
    metrics: dict[str, float] = dict(structure.metrics)
    against_id = None
    if not quick:
        if structure.blocked:
            why = f"the {', '.join(structure.blocked)} check(s) failed"
            checks += [skipped(n, why, group=Group.LOADING) for n in MODEL_CHECKS]
            checks += [skipped(n, why, group=Group.FIDELITY) for n in FIDELITY_CHECKS]
        else:
            say("Finding the original")
            original = resolve_original(tgt.folder, against, token, local=tgt.kind == "local")
            against_id = original.id if original.folder is not None else None
            more, found = model_checks(layout, Against(original, named=against is not None), sample, dev, thresholds,
                                       max_tokens, say, budget=budget, bar=bar)
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
        provenance=structure.origin.provenance.value if structure.origin is not None else None,
        unsupported=structure.unsupported or None,
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
