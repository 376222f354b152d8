"""The model card (README.md) of a converted checkpoint, written with huggingface_hub's ModelCard.

Metadata comes from the original model's card when the checkpoint came with
one, else from the preset; the body says what the model is, how it was
quantized, how big it is, how to load, serve and fine-tune it, and how
faithful it is (the figures of the latest `int8 verify`, when it has run).
The body's text is the template ``card_template.md`` beside this module (``card_template_bnb.md`` for
a bitsandbytes 8-bit output, `int8 convert --format bnb`);
`card_values` computes what fills it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from string import Template
from typing import Any

from ..blocks import block_candidates
from ..files import CARD_NAME, VERIFY_NAME
from ..presets import CardInfo, Preset
from ..report import BlockGroup, ConversionReport

TEMPLATE_PATH = Path(__file__).with_name("card_template.md")
"""The card's body: ``string.Template`` text whose ``${...}`` fields `card_values` fills (shipped in the wheel)."""
BNB_TEMPLATE_PATH = Path(__file__).with_name("card_template_bnb.md")
"""The body of a bitsandbytes 8-bit checkpoint's card (`int8 convert --format bnb`): the same fields."""


def is_bnb(report: ConversionReport) -> bool:
    from ..formats.bitsandbytes import is_report_format

    return is_report_format(report.quantization.format)


def template_path(report: ConversionReport) -> Path:
    return BNB_TEMPLATE_PATH if is_bnb(report) else TEMPLATE_PATH

_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[0-9a-f]{40}")


def base_model_id(report: ConversionReport) -> str | None:
    """The Hub id of the original model, if it has one (a local copy of a Hub snapshot counts)."""
    if report.source.kind in ("hub", "preset"):
        return report.source.id
    m = _CACHE_SNAPSHOT.search(report.source.id)
    return f"{m['owner']}/{m['name']}" if m else None


def original_metadata(path: Path | None) -> dict[str, Any]:
    """The metadata of the original model's card at ``path`` ({} without a readable one)."""
    if path is None or not Path(path).is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path).data.to_dict()
    except Exception:  # an unparseable original card is not a reason to fail the conversion
        return {}


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def preload() -> None:
    """Import what rendering a card needs (huggingface_hub's `ModelCardData`: tens of milliseconds) ahead of
    time: `int8 convert` calls it while the tensors stream, so the card costs little once they are written."""
    import huggingface_hub.repocard_data  # noqa: F401


def card_metadata(report: ConversionReport, preset: Preset | None, original: dict[str, Any]):
    from huggingface_hub.repocard_data import ModelCardData

    info = preset.card if preset else CardInfo()
    base = base_model_id(report)
    family = report.model.model_type
    data = ModelCardData(
        base_model=base,
        license=original.get("license") or info.license,
        language=_as_list(original.get("language")) or list(info.languages) or None,
        datasets=_as_list(original.get("datasets")) or list(info.datasets) or None,
        pipeline_tag=original.get("pipeline_tag")
        or info.pipeline_tag
        or ("text2text-generation" if report.model.task == "seq2seq-lm" else "text-generation"),
        library_name="transformers",
        tags=["8-bit", "int8", "bitsandbytes" if is_bnb(report) else "compressed-tensors", family],
    )
    if base:
        data.base_model_relation = "quantized"
    for key in ("license_name", "license_link"):
        if original.get(key):
            setattr(data, key, original[key])
    return data


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


_SMALL = "norms, biases and other small parameters (a tiny share of the size, and sensitive to rounding)"
_EMBED = "embeddings (looked up, not multiplied: int8 kernels would not speed them up)"


def _kept_summary(report: ConversionReport) -> str:
    """One line per reason a tensor stayed unquantized, with a few of the tensors' names."""
    groups: dict[str, list[str]] = {}
    for t in report.tensors:
        if t.action != "kept":
            continue
        reason = {"bias": _SMALL, "parameter": _SMALL, "buffer": _SMALL, "embedding": _EMBED}.get(t.reason, t.reason)
        groups.setdefault(reason, []).append(t.name)
    lines = []
    for reason, names in sorted(groups.items()):
        shown = ", ".join(f"`{n}`" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"  - {reason}: {len(names)} tensor(s), e.g. {shown}" if len(names) > 3 else f"  - {reason}: {shown}")
    return "\n".join(lines) or "  - nothing"


_METRICS = (
    ("top1_agreement", "top-1 next-token agreement with the original"),
    ("mean_kl", "mean KL divergence from the original (nats/token)"),
    ("ppl_original", "perplexity of the original"),
    ("ppl_converted", "perplexity of this checkpoint"),
    ("ppl_ratio", "perplexity ratio"),
    ("tokens", "tokens of text compared"),
)


def _cell(value: Any) -> str:
    return str("" if value is None else value).replace("|", "\\|").replace("\n", " ")


def _fidelity_section(folder: Path, report: ConversionReport) -> str:
    """The figures of the latest `int8 verify` (int8_verify.json) made for these very files, or how to get them."""
    if not (folder / VERIFY_NAME).is_file():  # a fresh conversion: no need to load the record's schema
        return _NOT_MEASURED
    from ..verify.result import RecordState, read_record

    record = read_record(folder, report.files)
    if record.state is RecordState.MISSING:
        return _NOT_MEASURED
    if record.state is RecordState.INVALID:
        return "The recorded verification result is unreadable; run `int8 verify --update-card` again."
    if record.state is RecordState.STALE:
        return (
            "Not measured for these files: the recorded `int8 verify` result was made for other files than the "
            "manifest lists now. Run `int8 verify --update-card` again."
        )
    result = record.data
    checks = result["checks"]
    metrics = result["metrics"]
    against = result.get("against") or "the original"
    when = f" on {str(result['created'])[:10]}" if result.get("created") else ""
    scope = "structure and integrity checks only" if result["quick"] else f"compared with {_cell(against)}"
    verdict = "All checks passed." if result["passed"] else "**Some checks failed**: see the table."
    lines = [f"Checked with `int8 verify` (int8 {_cell(result['int8_version'])}){when}, {scope}. {verdict}", ""]
    figures = [(label, metrics[key]) for key, label in _METRICS if metrics.get(key) is not None]
    if figures:
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {label} | {_cell(_fmt(value))} |" for label, value in figures]
        lines.append("")
    lines += ["| check | result | figure | threshold |", "|---|---|---|---|"]
    for c in checks:
        shown = {"pass": "pass", "fail": "**FAIL**", "skip": "skipped"}[c["status"]]
        lines.append(f"| {_cell(c['name'])} | {shown} | {_cell(c['figure'])} | {_cell(c['threshold'])} |")
    return "\n".join(lines)


_NOT_MEASURED = (
    "Not measured yet. Run `int8 verify` on this folder (or repo) to check its structure and compare it "
    "with the original; `int8 verify --update-card` records the figures here."
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_card(
    folder: Path,
    report: ConversionReport,
    preset: Preset | None = None,
    original_card: Path | None = None,
    repo_id: str | None = None,
    original: dict[str, Any] | None = None,
) -> str:
    """The model card text (README.md) for the converted checkpoint in ``folder``: the metadata block as
    huggingface_hub's `ModelCardData` writes it, then the body, as `huggingface_hub.ModelCard` holds a card
    (its loader reads it back to the same metadata; tests check both). Not `ModelCard` itself: importing it
    takes longer than converting a small model.

    ``repo_id`` is where the checkpoint is (or will be) published: the usage
    snippets load it from there. Without one they use the placeholder NAME-int8. ``original``: the original
    card's metadata when already read (`original_metadata`), instead of reading ``original_card``.
    """
    data = card_metadata(report, preset, original if original is not None else original_metadata(original_card))
    body = Template(template_path(report).read_text(encoding="utf-8")).substitute(card_values(folder, report, preset, repo_id))
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def card_values(folder: Path, report: ConversionReport, preset: Preset | None = None, repo_id: str | None = None) -> dict[str, str]:
    """What the template's ``${...}`` fields are filled with (every one of them, as text)."""
    base = base_model_id(report)
    q = report.quantization
    groups = q.block_groups or [BlockGroup(q.block_size, 0)]
    totals = report.totals
    causal = report.model.task == "causal-lm"
    prompt = (preset.card.sample_prompt if preset and preset.card.sample_prompt else None) or (
        "The capital of France is" if causal else "Translate to German: How old are you?"
    )
    return {
        "name": (base or Path(report.source.id).name).split("/")[-1],
        "origin": f"[{base}](https://huggingface.co/{base})" if base else f"a local checkpoint ({Path(report.source.id).name})",
        "about": preset.description if preset and preset.description else f"a {report.model.architecture} model",
        "block_size": _or(str(g.block_size) for g in groups),
        "block_note": _block_note(report),
        "group_note": ", one config group per size" if len(groups) > 1 else "",
        "dtype": q.dtype,
        "scale_dtype": q.scale_dtype,
        "scale_note": _scale_note(q.scale_dtype),
        "size_in": _gb(totals.bytes_in),
        "size_out": _gb(totals.bytes_out),
        "ratio": f"{totals.ratio:.2f}",
        "int8_version": report.int8_version,
        "provenance": _provenance(report),
        "see_original": _see_original(base),
        "kept_summary": _kept_summary(report),
        "source_format": report.source.format,
        "params_quantized": f"{totals.params_quantized:,}",
        "params_kept": f"{totals.params_kept:,}",
        "auto_class": "AutoModelForCausalLM" if causal else "AutoModelForSeq2SeqLM",
        "repo": repo_id or placeholder_repo(report),
        "prompt": json.dumps(prompt),
        "fidelity": _fidelity_section(folder, report),
        **_embedding_values(report, repo_id or placeholder_repo(report)),
    }


def _embedding_values(report: ConversionReport, repo: str) -> dict[str, str]:
    """The card's words on loaders: every stock loader reads the checkpoint, unless its token embeddings are
    quantized (``--embeddings int8``; `int8.formats.compressed_tensors.EMBEDDING_LOADERS`)."""
    from ..formats.compressed_tensors import EMBEDDING_LOADERS

    embeddings = report.quantized_embeddings
    if not embeddings:
        return {"loaders": "plain transformers loads it and vLLM serves it", "embeddings_note": "", "ct_import": "",
                "ct_kwargs": "", "vllm_section": f"Serve it with vLLM:\n\n```bash\nvllm serve {repo}\n```"}
    sharing = [t.name for t in report.tensors if t.action == "dropped" and t.tied_to in embeddings]
    one_size = len(report.quantization.block_groups) <= 1
    note = (
        f"\n- The token embeddings ({', '.join(f'`{e}`' for e in embeddings)}) and the output head are quantized too "
        "(`int8 convert --embeddings int8`), in blocks along the embedding dimension"
        + (f"; {', '.join(f'`{n}`' for n in sharing)} share the embedding's codes (tied)" if sharing else "")
        + ". Which loaders read it: "
        + "; ".join(f"**{k}**: {v}" for k, v in EMBEDDING_LOADERS.items())
        + ("." if one_size else ". This checkpoint has several block sizes, so stock transformers cannot load it: use int8.load.")
    )
    return {
        "loaders": "with its token embeddings quantized, only int8.load runs it as stored (see the next line)",
        "embeddings_note": note,
        "ct_import": ", CompressedTensorsConfig",
        "ct_kwargs": ", quantization_config=CompressedTensorsConfig(dequantize=True)",
        "vllm_section": f"vLLM cannot serve it ({EMBEDDING_LOADERS['vLLM'].removeprefix('no (').removesuffix(')')}): "
                        "convert without `--embeddings int8` for vLLM.",
    }


def _or(items) -> str:
    """'a', 'a or b', 'a, b or c'."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _block_note(report: ConversionReport) -> str:
    """Which layers got which block size, when they did not all get one."""
    groups = report.quantization.block_groups
    if len(groups) < 2:
        return ""
    sizes = ", ".join(map(str, block_candidates(report.quantization.block_size)))
    each = "; ".join(
        f"{g.block_size} for {g.layers} layer(s) of input width {_or([str(w) for w in g.input_widths])}" for g in groups
    )
    return f" (the largest of {sizes} that divides the layer's input width: {each})"


def _scale_note(scale_dtype: str) -> str:
    """What the card adds after 'within half a scale of the original' when the scales are not float32."""
    if scale_dtype == "float32":
        return ""
    return (
        f" (stock loaders compute that product in {scale_dtype}, which rounds it once more: "
        "up to about one scale; `int8 convert --scale-dtype fp32` avoids it)"
    )


def placeholder_repo(report: ConversionReport) -> str:
    """The id the snippets use before the checkpoint has a repo: NAME-int8, as `int8 convert` names the folder."""
    base = base_model_id(report)
    return f"{(base or Path(report.source.id).name).split('/')[-1]}-int8"


def _see_original(base: str | None) -> str:
    if not base:
        return ""
    return (
        f"See the [original model card](https://huggingface.co/{base}) for what the model does, "
        "how it was trained, its limitations and its license."
    )


def _provenance(report: ConversionReport) -> str:
    src = report.source
    if src.kind in ("hub", "preset") and src.commit:
        return f" from commit `{src.commit[:12]}` of `{src.id}`" + (f" (preset `{src.preset}`)" if src.preset else "")
    return ""


_SERVE_LINE = re.compile(
    r'^(?:vllm serve (?P<repo>[\w.-]+(?:/[\w.-]+)?)|model_id = "(?P<bnb>[\w.-]+(?:/[\w.-]+)?)")\s*$', re.MULTILINE
)
_LOAD_LINE = re.compile(r'^model = int8\.load\("(?P<repo>[\w.-]+(?:/[\w.-]+)?)"\)\s*$', re.MULTILINE)


def recorded_repo_id(card_path: Path) -> str | None:
    """The repo id a card written by int8 was rendered for (its `vllm serve` snippet, else its `int8.load` one:
    a card of quantized embeddings has no vLLM snippet), if any."""
    try:
        text = Path(card_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    m = _SERVE_LINE.search(text) or _LOAD_LINE.search(text)
    repo = m and (m.groupdict().get("repo") or m.groupdict().get("bnb"))
    return repo if repo and "/" in repo else None


def write_card(
    folder: Path,
    report: ConversionReport,
    preset: Preset | None = None,
    original_card: Path | None = None,
    repo_id: str | None = None,
    original: dict[str, Any] | None = None,
) -> Path:
    """Write README.md into ``folder``.

    ``original_card`` is the source model's README.md (or ``original``, its metadata already read); without
    one, the metadata of the card already in ``folder`` is kept (a rewrite after
    `int8 verify` keeps the license, languages and datasets it had), and so is
    the repo id its snippets were rendered for, unless ``repo_id`` names another.
    """
    return save_card(folder, card_text(folder, report, preset, original_card, repo_id, original))


def card_text(
    folder: Path,
    report: ConversionReport,
    preset: Preset | None = None,
    original_card: Path | None = None,
    repo_id: str | None = None,
    original: dict[str, Any] | None = None,
) -> str:
    """What `write_card` would write, without writing it."""
    folder = Path(folder)
    existing = folder / CARD_NAME
    if repo_id is None and existing.is_file():
        repo_id = recorded_repo_id(existing)
    if original is None and (original_card is None or not Path(original_card).is_file()):
        original_card = existing if existing.is_file() else _cached_original_card(report)
    return render_card(folder, report, preset, original_card, repo_id, original)


def save_card(folder: Path, text: str) -> Path:
    """Replace ``folder``/README.md with ``text``, atomically."""
    folder = Path(folder)
    existing = folder / CARD_NAME
    tmp = folder / f".{CARD_NAME}.int8-tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    tmp.replace(existing)
    return existing


def _cached_original_card(report: ConversionReport) -> Path | None:
    """The source model's README.md from the Hub cache, when the checkpoint came from the Hub and it is still there."""
    base = base_model_id(report)
    if base is None:
        return None
    local = Path(report.source.id) / CARD_NAME
    if report.source.kind == "local" and local.is_absolute() and local.is_file():  # reports before names only
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base, CARD_NAME, revision=report.source.commit or report.source.revision)
    except Exception:  # no cache, a malformed id: no original card, the preset's metadata still applies
        return None
    return Path(found) if isinstance(found, str) else None


def rewrite_card(folder: Path, repo_id: str | None = None) -> Path:
    """Render README.md again from ``int8_report.json`` and the latest ``int8_verify.json`` in ``folder``.

    What `int8 card` and `int8 verify --update-card` call. Raises
    `int8.errors.Int8Error` when the folder has no readable conversion report.
    """
    return save_card(folder, render_for_folder(folder, repo_id))


def render_for_folder(folder: Path, repo_id: str | None = None) -> str:
    """The card `rewrite_card` would write, as text; the folder is not changed (what `int8 push` uploads)."""
    from ..errors import SourceNotFound
    from ..presets import get_preset

    folder = Path(folder)
    if not folder.is_dir():
        raise SourceNotFound(f"folder {folder} does not exist")
    report = load_report(folder)
    preset = get_preset(report.source.preset) if report.source.preset else None
    return card_text(folder, report, preset=preset, repo_id=repo_id)


def load_report(folder: Path) -> ConversionReport:
    """``folder``'s conversion report, which the card is rendered from; `int8.errors.Int8Error` when it has none or it is unreadable."""
    from ..errors import Int8Error
    from ..report import REPORT_NAME

    try:
        return ConversionReport.load(folder)
    except FileNotFoundError:
        raise Int8Error(
            f"{folder} has no {REPORT_NAME}: it was not written by `int8 convert`",
            "The card is rendered from the conversion report; convert the model with int8 first.",
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Int8Error(f"{folder / REPORT_NAME} is unreadable ({e})",
                        "Convert the model again (--overwrite) to write a fresh report.") from None
