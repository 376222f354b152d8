"""The model card (README.md) of a converted checkpoint, written with huggingface_hub's ModelCard.

Metadata comes from the original model's card when the checkpoint came with
one, else from the preset; the body says what the model is, how it was
quantized, how big it is, how to load, serve and fine-tune it, and how
faithful it is (the figures of the latest `int8 verify`, when it has run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..presets import CardInfo, Preset
from ..report import ConversionReport

CARD_NAME = "README.md"
VERIFY_NAME = "int8_verify.json"
"""Where `int8 verify` leaves its latest result in the folder it checked; the card reads it."""

_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[0-9a-f]{40}")


def base_model_id(report: ConversionReport) -> str | None:
    """The Hub id of the original model, if it has one (a local copy of a Hub snapshot counts)."""
    if report.source.kind in ("hub", "preset"):
        return report.source.id
    m = _CACHE_SNAPSHOT.search(report.source.id)
    return f"{m['owner']}/{m['name']}" if m else None


def _original_metadata(path: Path | None) -> dict[str, Any]:
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


def card_metadata(report: ConversionReport, preset: Preset | None, original: dict[str, Any]):
    from huggingface_hub import ModelCardData

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
        tags=["8-bit", "int8", "compressed-tensors", family],
    )
    if base:
        data.base_model_relation = "quantized"
    for key in ("license_name", "license_link"):
        if original.get(key):
            setattr(data, key, original[key])
    return data


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _kept_summary(report: ConversionReport) -> str:
    groups: dict[str, int] = {}
    for t in report.tensors:
        if t.action != "kept":
            continue
        reason = t.reason
        if reason in ("bias", "parameter", "buffer"):
            reason = "norms, biases and other small parameters"
        elif reason == "embedding":
            reason = "embeddings (looked up, not multiplied)"
        groups[reason] = groups.get(reason, 0) + 1
    return "\n".join(f"  - {reason}: {n} tensor(s)" for reason, n in sorted(groups.items())) or "  - nothing"


def _fidelity_section(folder: Path) -> str:
    path = folder / VERIFY_NAME
    if not path.is_file():
        return (
            "Not measured yet. Run `int8 verify` on this folder (or repo) to check its structure and compare it "
            "with the original; `int8 verify --update-card` records the figures here."
        )
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return "The recorded verification result is unreadable; run `int8 verify --update-card` again."
    rows = ["| check | result | figure | threshold |", "|---|---|---|---|"]
    for check in result.get("checks", []):
        rows.append(
            f"| {check.get('name', '')} | {'pass' if check.get('passed') else 'FAIL'} | "
            f"{check.get('figure', '')} | {check.get('threshold', '')} |"
        )
    against = result.get("against") or "the original"
    return f"Verified with int8 {result.get('int8_version', '')} against {against}:\n\n" + "\n".join(rows)


def render_card(folder: Path, report: ConversionReport, preset: Preset | None = None, original_card: Path | None = None):
    """Build the ModelCard for the converted checkpoint in ``folder``."""
    from huggingface_hub import ModelCard

    original = _original_metadata(original_card)
    data = card_metadata(report, preset, original)
    base = base_model_id(report)
    name = (base or Path(report.source.id).name).split("/")[-1]
    repo_hint = f"{name}-int8"
    q = report.quantization
    totals = report.totals
    causal = report.model.task == "causal-lm"
    auto = "AutoModelForCausalLM" if causal else "AutoModelForSeq2SeqLM"
    prompt = (preset.card.sample_prompt if preset and preset.card.sample_prompt else None) or (
        "The capital of France is" if causal else "Translate to German: How old are you?"
    )
    about = preset.description if preset and preset.description else f"a {report.model.architecture} model"
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"a local checkpoint ({Path(report.source.id).name})"
    body = f"""
# {name} (int8)

An 8-bit version of {origin}: {about}. The large weight matrices are stored in
int8 with one absmax scale per block of {q.block_size} values, which takes the checkpoint
from {_gb(totals.bytes_in)} to {_gb(totals.bytes_out)} ({totals.ratio:.2f}x smaller) so it loads, runs
and fine-tunes on one ordinary GPU. Converted with int8 {report.int8_version}.
{"See the [original model card](https://huggingface.co/" + base + ") for what the model does, how it was trained, its limitations and its license." if base else ""}

## How it was quantized

- Every `nn.Linear` weight, except those listed below, in blocks of {q.block_size} consecutive input values:
  `scale = absmax / 127` (stored in {q.dtype}), `q = round(w / scale)` in [-127, 127].
  Each weight is reconstructed as `q * scale`, within half a scale of the original.
- Stored in the [compressed-tensors](https://github.com/neuralmagic/compressed-tensors) `pack-quantized`
  format (8 bits, symmetric, group size {q.block_size}): plain transformers loads it and vLLM serves it.
- Kept in {q.dtype} (not quantized), and why:
{_kept_summary(report)}

| | size |
|---|---|
| original ({report.source.format}) | {_gb(totals.bytes_in)} |
| int8 checkpoint | {_gb(totals.bytes_out)} |
| quantized parameters | {totals.params_quantized:,} |
| unquantized parameters | {totals.params_kept:,} |

## Use it

With transformers (needs `pip install compressed-tensors`):

```python
from transformers import AutoTokenizer, {auto}

model = {auto}.from_pretrained("{repo_hint}", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo_hint}")
inputs = tokenizer({json.dumps(prompt)}, return_tensors="pt").to(model.device)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0], skip_special_tokens=True))
```

Keeping the weights in int8 in memory (de-quantized block by block at each multiplication), with int8:

```python
import int8

model = int8.load("{repo_hint}")
```

Serve it with vLLM:

```bash
vllm serve {repo_hint}
```

## Fine-tune it with LoRA

The int8 weights stay frozen; small LoRA adapters train on top (the recipe of the original 8-bit GPT-J):

```python
import int8
from peft import LoraConfig, get_peft_model

model = int8.load("{repo_hint}")
model.gradient_checkpointing_enable()
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
# train as usual; on CUDA, bitsandbytes' 8-bit Adam keeps optimizer memory small
```

## Fidelity

{_fidelity_section(folder)}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_card(
    folder: Path, report: ConversionReport, preset: Preset | None = None, original_card: Path | None = None
) -> Path:
    """Write README.md into ``folder``.

    ``original_card`` is the source model's README.md; without one, the
    metadata of the card already in ``folder`` is kept (a rewrite after
    `int8 verify` keeps the license, languages and datasets it had).
    """
    folder = Path(folder)
    if original_card is None or not Path(original_card).is_file():
        original_card = folder / CARD_NAME
    card = render_card(folder, report, preset, original_card)
    path = folder / CARD_NAME
    card.save(path)
    return path
