"""The model card's text lives in a template file; rendering it gives the very bytes int8 wrote before.

The goldens under tests/data/cards/ were rendered by the f-string card of int8 before the template
(same reports, metadata, verify records); a change to the card's wording must update them on purpose.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from string import Template

import pytest

from int8.hub import card as card_module
from int8.hub.card import render_card
from int8.presets import CardInfo, Preset
from int8.report import ConversionReport
from int8.verify.result import SCHEMA as VERIFY_SCHEMA
from int8.verify.result import VERIFY_NAME, manifest_digest

DATA = Path(__file__).parent / "data" / "cards"
ORIGINAL_CARD = (
    "---\nlicense: mit\nlanguage:\n- en\n- fr\ndatasets:\n- wikitext\npipeline_tag: text-generation\n"
    "tags:\n- tiny\n---\n# Tiny GPT-J\n\nA tiny model for tests.\n"
)
PRESET = Preset(
    name="tiny-t5", repo="org/tiny-t5", description="a tiny T5 for tests",
    card=CardInfo(license="apache-2.0", languages=("en", "de"), datasets=("c4",), sample_prompt="Translate to German: It's \"1|2\"."),
)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _report(arch: str, **source) -> ConversionReport:
    report = ConversionReport.from_dict(json.loads((DATA / f"report_{arch}.json").read_text()))
    return dataclasses.replace(report, source=dataclasses.replace(report.source, **source)) if source else report


def _record(report: ConversionReport, *, passed: bool, quick: bool = False, bound: bool = True, **extra) -> dict:
    checks = [
        {"name": "sha256", "status": "pass", "passed": True, "figure": "3 files match", "threshold": "every file", "group": "integrity"},
        {"name": "top1", "status": "pass" if passed else "fail", "passed": passed, "figure": "98.4% | agree\nnext",
         "threshold": ">= 90.0%", "group": "fidelity"},
        {"name": "kl", "status": "skip", "passed": True, "figure": "not run: no GPU", "threshold": "", "group": "fidelity"},
    ]
    return {
        "schema": VERIFY_SCHEMA, "int8_version": "0.1.0", "created": "2026-11-30T10:00:00+00:00", "target": "out",
        "quick": quick, "passed": passed, "against": "alice/tiny", "checks": checks,
        "metrics": {"top1_agreement": 0.98376, "mean_kl": 7.8e-06, "ppl_original": 12.5, "ppl_converted": None, "tokens": 2032},
        "manifest_sha256": manifest_digest(report.files) if bound else "0" * 64, **extra,
    }


def _case(name: str, folder: Path) -> str:
    """Render case ``name`` in ``folder``; the inputs of each golden."""
    original = None
    if name == "local_gptj":
        report, preset, repo_id, record = _report("gptj"), None, None, None
    elif name == "hub_gptj_verified":
        report = _report("gptj", kind="hub", id="alice/tiny", commit=COMMIT, revision="main")
        preset, repo_id = None, "alice/tiny-int8"
        record = _record(report, passed=True)
        original = folder / "original.md"
        original.write_text(ORIGINAL_CARD)
    elif name == "hub_gptj_failed_quick":
        report = _report("gptj", kind="hub", id="alice/tiny", commit=None)
        preset, repo_id = None, None
        record = _record(report, passed=False, quick=True, created="", against=None)
    elif name == "preset_t5_stale":
        report = _report("t5", kind="preset", id=PRESET.repo, preset=PRESET.name, commit=COMMIT)
        preset, repo_id, record = PRESET, "bob/t5-int8", _record(report, passed=True, bound=False)
    elif name == "local_t5_invalid":
        report, preset, repo_id, record = _report("t5", id="models--org--t5/snapshots/" + COMMIT), None, None, "{not json"
    else:
        raise ValueError(name)
    if record is not None:
        (folder / VERIFY_NAME).write_text(record if isinstance(record, str) else json.dumps(record))
    return str(render_card(folder, report, preset, original, repo_id))


CASES = ["local_gptj", "hub_gptj_verified", "hub_gptj_failed_quick", "preset_t5_stale", "local_t5_invalid"]


@pytest.mark.parametrize("name", CASES)
def test_the_template_renders_the_golden_card(name, tmp_path):
    rendered = _case(name, tmp_path)
    golden = (DATA / f"{name}.md").read_text(encoding="utf-8")
    assert rendered == golden


@pytest.mark.parametrize("name", CASES)
def test_huggingface_hubs_model_card_holds_the_text_as_written(name, tmp_path):
    """int8 writes the card text itself (importing ModelCard is slow); huggingface_hub's ModelCard parses it
    to the metadata int8 built and serializes it back to the very same text."""
    from huggingface_hub import ModelCard

    rendered = _case(name, tmp_path)
    card = ModelCard(rendered)
    assert str(card) == rendered
    assert card.data.to_dict()["library_name"] == "transformers"


def test_the_cases_differ_where_their_inputs_do(tmp_path):
    texts = {}
    for name in CASES:
        (tmp_path / name).mkdir()
        texts[name] = _case(name, tmp_path / name)
    assert len(set(texts.values())) == len(CASES)
    quick = texts["hub_gptj_failed_quick"]
    assert "**Some checks failed**" in quick and "structure and integrity checks only" in quick
    assert "Not measured for these files" in texts["preset_t5_stale"] and "AutoModelForSeq2SeqLM" in texts["preset_t5_stale"]
    assert "unreadable" in texts["local_t5_invalid"] and "[org/t5](https://huggingface.co/org/t5)" in texts["local_t5_invalid"]


def test_the_template_has_exactly_the_values_the_card_computes(tmp_path):
    template = Template(card_module.TEMPLATE_PATH.read_text(encoding="utf-8"))
    assert template.is_valid() and "$$" not in template.template  # no escaped dollar: the text has none
    values = card_module.card_values(tmp_path, _report("gptj"))
    assert set(template.get_identifiers()) == set(values)  # no field left unfilled, no value computed for nothing
    assert all(isinstance(v, str) for v in values.values())


def test_the_template_ships_inside_the_package():
    import int8

    assert card_module.TEMPLATE_PATH.parent == Path(int8.__file__).parent / "hub"
    assert card_module.TEMPLATE_PATH.suffix == ".md" and card_module.TEMPLATE_PATH.is_file()


def test_the_cards_lora_snippet_runs_on_the_checkpoint(tmp_path):
    """The fine-tuning snippet is int8's API of today: LoRA adapters on the int8 layers, an optimizer over them."""
    import re
    import sys

    import torch

    import int8
    from int8.runtime import Int8LoraLinear

    sys.path.insert(0, str(Path(__file__).parent))
    from models import make_tiny

    out = tmp_path / "out"
    int8.convert(make_tiny("gptj", tmp_path / "m"), out, device="cpu", block_size=64)
    text = (out / "README.md").read_text(encoding="utf-8")
    snippet = re.findall(r"```python\n(.*?)```", text, re.S)[2]
    assert "from int8.runtime import adapter_optimizer, get_peft_model" in snippet and "from peft import get_peft_model" not in text
    scope: dict = {}
    exec(compile(snippet.replace('int8.load("m-int8")', f"int8.load({str(out)!r}, device='cpu')"), "card-lora", "exec"), scope)
    model, optimizer = scope["model"], scope["optimizer"]
    adapters = [m for m in model.modules() if isinstance(m, Int8LoraLinear)]
    assert adapters and isinstance(optimizer, torch.optim.Optimizer)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and trainable == {id(p) for g in optimizer.param_groups for p in g["params"]}
