"""The model card `int8 convert` writes, `int8 card` rewrites and `int8 push` publishes.

Metadata from the original card or the preset, read back with huggingface_hub's
ModelCard and checked with the Hub's own validate-yaml call (the test Hub makes
it); a body that says what the model is, how it was quantized, how big it is,
how to load, serve and fine-tune it, and the latest `int8 verify` figures.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from hubserver import validate_card_metadata
from huggingface_hub import ModelCard
from models import make_tiny
from test_hub_download import folder_files, run_main

import int8
from int8.hub.card import base_model_id, recorded_repo_id, rewrite_card
from int8.report import ConversionReport
from int8.verify import Check, VerifyResult
from int8.verify.result import manifest_digest

ORIGINAL_CARD = (
    "---\nlicense: mit\nlanguage:\n- en\n- fr\ndatasets:\n- wikitext\npipeline_tag: text-generation\n"
    "tags:\n- tiny\n---\n# Tiny GPT-J\n\nA tiny model for tests.\n"
)


@pytest.fixture(scope="module")
def gptj_files(tmp_path_factory) -> dict[str, bytes]:
    files = folder_files(make_tiny("gptj", tmp_path_factory.mktemp("gptj") / "m"))
    return {**files, "README.md": ORIGINAL_CARD.encode()}


def convert(source, out, **kw):
    return int8.convert(source, out, device="cpu", **{"block_size": 64, **kw})


def card_of(folder: Path) -> tuple[dict, str]:
    card = ModelCard.load(folder / "README.md")
    return card.data.to_dict(), card.text


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def assert_valid_on_the_hub(folder: Path) -> None:
    content = (folder / "README.md").read_text()
    errors, warnings = validate_card_metadata(content)
    assert errors == [] and warnings == [], (errors, warnings)
    ModelCard.load(folder / "README.md").validate()  # POST /api/validate-yaml, as the Hub does on upload


def test_card_from_a_hub_model_with_its_original_card(hub, gptj_files, tmp_path):
    hub.create_repo("alice/tiny", gptj_files)
    report = convert("alice/tiny", tmp_path / "out")
    data, text = card_of(tmp_path / "out")
    assert data["base_model"] == "alice/tiny" and data["base_model_relation"] == "quantized"
    assert data["license"] == "mit" and data["language"] == ["en", "fr"] and data["datasets"] == ["wikitext"]
    assert data["pipeline_tag"] == "text-generation" and data["library_name"] == "transformers"
    assert data["tags"] == ["8-bit", "int8", "compressed-tensors", "gptj"]
    assert_valid_on_the_hub(tmp_path / "out")
    assert hub.log.count(kind="validate-yaml", status=200) == 1

    # The body: origin, method, what stayed unquantized and why, sizes, usage, fine-tuning, fidelity.
    assert "[alice/tiny](https://huggingface.co/alice/tiny)" in text
    assert f"commit `{report.source.commit[:12]}`" in text
    assert "original model card](https://huggingface.co/alice/tiny)" in text
    assert "block of 64 values" in text and "group size 64" in text
    assert "output head: kept unquantized for accuracy: `lm_head.weight`" in text
    assert "embeddings (looked up, not multiplied" in text and "`transformer.wte.weight`" in text
    kb_in, kb_out = report.totals.bytes_in / 1e6, report.totals.bytes_out / 1e6
    assert f"| original (safetensors) | {kb_in:.1f} MB |" in text and f"| int8 checkpoint | {kb_out:.1f} MB |" in text
    assert f"({report.totals.ratio:.2f}x smaller)" in text
    assert f"{report.totals.params_quantized:,}" in text
    transformers_snippet, load_snippet, lora_snippet = python_blocks(text)
    assert 'AutoModelForCausalLM.from_pretrained("tiny-int8"' in transformers_snippet
    assert "vllm serve tiny-int8" in text
    assert "get_peft_model" in lora_snippet and "LoraConfig" in lora_snippet
    assert "Not measured yet" in text and "int8 verify --update-card" in text


def test_card_from_a_preset_without_an_original_card(hub, tmp_path):
    """The test Hub stands in for google/flan-t5-small; the preset supplies the metadata."""
    files = folder_files(make_tiny("t5", tmp_path / "t5"))
    hub.create_repo("google/flan-t5-small", files)
    convert("flan-t5-small", tmp_path / "out", block_size=None)
    data, text = card_of(tmp_path / "out")
    assert data["base_model"] == "google/flan-t5-small" and data["base_model_relation"] == "quantized"
    assert data["license"] == "apache-2.0" and data["language"] == ["en", "fr", "ro", "de"]
    assert "gsm8k" in data["datasets"] and data["pipeline_tag"] == "text2text-generation"
    assert "t5" in data["tags"]
    assert_valid_on_the_hub(tmp_path / "out")
    assert "Flan-T5 Small, Google's instruction-finetuned T5" in text and "preset `flan-t5-small`" in text
    assert "AutoModelForSeq2SeqLM" in text and '"Translate to German: My name is Arthur"' in text
    assert "block of 32 values" in text  # the default block size (the preset pins none)


def test_card_for_a_local_folder(gptj_files, tmp_path, monkeypatch):
    src = tmp_path / "my-model"
    src.mkdir()
    for name, data in gptj_files.items():
        if name != "README.md":
            (src / name).write_bytes(data)
    report = convert(src, tmp_path / "out")
    data, text = card_of(tmp_path / "out")
    assert "base_model" not in data and "base_model_relation" not in data  # nothing to point to
    assert data["library_name"] == "transformers" and "int8" in data["tags"]
    assert "a local checkpoint (my-model)" in text and 'from_pretrained("my-model-int8"' in text
    assert validate_card_metadata((tmp_path / "out" / "README.md").read_text()) == ([], [])
    assert base_model_id(report) is None
    # the scales' dtype, fp32 by default: the stock loader decodes the weights int8 wrote, nothing to warn of
    assert "(stored in float32)" in text and "Kept in bfloat16" in text and "rounds it once more" not in text
    convert(src, tmp_path / "bf16-scales", scale_dtype="bf16", dtype="fp16")
    _, text = card_of(tmp_path / "bf16-scales")
    assert "(stored in bfloat16)" in text and "Kept in float16" in text
    assert "stock loaders compute that product in bfloat16, which rounds it once more" in text

    # A folder inside the Hub cache still knows where it came from.
    snap = tmp_path / "hub" / "models--alice--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(src, snap)
    (snap / "README.md").write_text(ORIGINAL_CARD)
    convert(snap, tmp_path / "from-cache")
    data, _ = card_of(tmp_path / "from-cache")
    assert data["base_model"] == "alice/tiny" and data["license"] == "mit"


def verify_result(folder: Path, passed: bool = True) -> VerifyResult:
    """A result of `int8 verify` as its own API builds and saves it."""
    checks = [
        Check("sha256", True, figure="14 files match", threshold="every file of the manifest"),
        Check("top1", passed, figure="98.4% | agree" if passed else "41.0%", threshold=">= 90.0%", group="fidelity"),
        Check("kl", True, figure="not run: no GPU", group="fidelity", status="skip"),
    ]
    result = VerifyResult(
        target=str(folder), checks=checks, quick=False, against="alice/tiny",
        metrics={"top1_agreement": 0.98376, "mean_kl": 7.8e-06, "ppl_ratio": 1.00004, "tokens": 2032},
        manifest_sha256=manifest_digest(ConversionReport.load(folder).files),  # bound to these very files
    )
    result.save(folder)
    return result


def test_int8_card_records_the_latest_verify_result(hub, gptj_files, tmp_path, capsys):
    hub.create_repo("alice/tiny", gptj_files)
    convert("alice/tiny", tmp_path / "out")
    folder = tmp_path / "out"
    before = (folder / "README.md").read_text()
    code, out, err = run_main(capsys, "card", str(folder))
    assert code == 0 and f"Wrote {folder / 'README.md'}" in out, err
    assert (folder / "README.md").read_text() == before  # same inputs, same card

    verify_result(folder)
    code, out, err = run_main(capsys, "card", str(folder))
    assert code == 0, err
    data, text = card_of(folder)
    fidelity = text.split("## Fidelity", 1)[1]
    assert "compared with alice/tiny. All checks passed." in fidelity
    assert "| top-1 next-token agreement with the original | 0.9838 |" in fidelity
    assert "| mean KL divergence from the original (nats/token) | 7.8e-06 |" in fidelity
    assert "| top1 | pass | 98.4% \\| agree | >= 90.0% |" in fidelity  # a | in a figure does not break the table
    assert "| kl | skipped | not run: no GPU |" in fidelity
    assert data["license"] == "mit" and data["datasets"] == ["wikitext"]  # metadata kept on a rewrite
    assert_valid_on_the_hub(folder)

    # --repo points the snippets at the repo; later rewrites keep it.
    code, _, err = run_main(capsys, "card", str(folder), "--repo", "alice/tiny-int8")
    assert code == 0, err
    assert recorded_repo_id(folder / "README.md") == "alice/tiny-int8"
    verify_result(folder, passed=False)
    rewrite_card(folder)
    _, text = card_of(folder)
    assert 'from_pretrained("alice/tiny-int8"' in text and "vllm serve alice/tiny-int8" in text
    assert "**Some checks failed**" in text and "| top1 | **FAIL** | 41.0% |" in text
    assert "tiny-int8\"" not in text.replace("alice/tiny-int8\"", "")

    # Not an int8 folder: exit 2, no traceback.
    for bad in (tmp_path / "missing", tmp_path / "plain"):
        if bad.name == "plain":
            bad.mkdir()
        code, _, err = run_main(capsys, "card", str(bad))
        assert code == 2 and "Traceback" not in err
    assert "was not written by `int8 convert`" in err


def test_custom_license_and_odd_original_metadata_survive(hub, gptj_files, tmp_path):
    card = (
        "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\nlanguage: en\n"
        "pipeline_tag: text-generation\n---\n# Tiny\n"
    )
    hub.create_repo("alice/custom", {**gptj_files, "README.md": card, "LICENSE": "Use it kindly.\n"})
    convert("alice/custom", tmp_path / "out")
    data, _ = card_of(tmp_path / "out")
    assert data["license"] == "other" and data["license_name"] == "tiny-license" and data["license_link"] == "LICENSE"
    assert data["language"] == ["en"]
    assert (tmp_path / "out" / "LICENSE").read_text() == "Use it kindly.\n"
    assert_valid_on_the_hub(tmp_path / "out")

    # An original card whose metadata cannot be parsed does not stop the conversion.
    hub.create_repo("alice/broken-card", {**gptj_files, "README.md": "---\nlicense: [unclosed\n---\n# x\n"})
    convert("alice/broken-card", tmp_path / "out2")
    data, _ = card_of(tmp_path / "out2")
    assert data["base_model"] == "alice/broken-card" and "license" not in data
    assert_valid_on_the_hub(tmp_path / "out2")
