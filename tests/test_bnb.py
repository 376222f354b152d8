"""`int8 convert --format bnb`: transformers' serialized bitsandbytes 8-bit layout, proved against transformers
+ bitsandbytes themselves (on CPU, bitsandbytes 0.50).

The reference for every model is what transformers writes for ``from_pretrained(fp32_folder,
quantization_config=BitsAndBytesConfig(load_in_8bit=True))`` followed by ``save_pretrained``: int8's codes,
SCB, weight_format and kept tensors must equal it tensor by tensor (GPT-2's Conv1D weights transposed to (out, in),
as transformers does), and its quantization_config equal what
transformers writes. Stock ``from_pretrained(folder)`` then builds ``Linear8bitLt`` layers that generate,
and PEFT's k-bit recipe trains LoRA on them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from models import make_tiny
from safetensors.torch import load_file

import int8
from int8.errors import UsageError
from int8.rowwise import dequantize_rows, quantize_rows

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

ARCHS = ("gptj", "bloom", "t5", "mt5", "gpt2")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(p))
    return out


def model_class(folder: Path):
    import transformers as tf

    return getattr(tf, tf.AutoConfig.from_pretrained(folder).architectures[0])


def transformers_8bit(src: Path, out: Path, skip_modules: list[str] | None = None) -> Path:
    """What transformers + bitsandbytes write for ``src`` loaded with load_in_8bit (on CPU)."""
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    model_class(src).from_pretrained(src, quantization_config=qc, device_map="cpu").save_pretrained(out)
    return out


def quantization_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())["quantization_config"]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """(arch, fp32 source, int8's bnb output)."""
    root = tmp_path_factory.mktemp(request.param)
    src = make_tiny(request.param, root / "fp32")
    out = root / "bnb"
    int8.convert(src, out, format="bnb", dtype="fp32", device="cpu")
    return request.param, src, out


# --------------------------------------------------------------------------- the row math


def test_rows_equal_bitsandbytes_int8_vectorwise_quant():
    """Codes and SCB equal bitsandbytes' own function, bit for bit: random rows, a zero row, an outlier
    column beyond the threshold (not held back when quantizing), values at exactly half a step, bf16."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen) * 0.05
    w[:, 7] = 9.0  # an outlier column
    w[3] = 0
    w[10] = torch.arange(96) / 95 * 0.5  # many values a whole number of half steps from 0
    for x in (w, w.to(torch.bfloat16), w * 1e-6):
        got = quantize_rows(x)
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(x.to(torch.float16).contiguous())
        assert torch.equal(got.codes, cb) and torch.equal(got.scb, scb)
    got = quantize_rows(w)
    assert not got.codes[3].any() and got.scb[3] == 0
    assert torch.equal(dequantize_rows(got.codes, got.scb), bnb.functional.int8_vectorwise_dequant(got.codes, got.scb))


def test_rows_refuse_what_float16_cannot_hold():
    from int8.quantize import NonFiniteWeights

    with pytest.raises(NonFiniteWeights, match="float16"):
        quantize_rows(torch.full((2, 4), 70000.0))
    with pytest.raises(NonFiniteWeights, match="NaN"):
        quantize_rows(torch.tensor([[1.0, float("nan")]]))


# --------------------------------------------------------------------------- transformers' own output


def test_tensors_equal_transformers_load_in_8bit(pair, tmp_path):
    """Every tensor int8 writes equals what transformers' load_in_8bit + save_pretrained writes (same names,
    dtypes and values: codes, SCB, weight_format and the tensors kept), and the same layers are quantized."""
    arch, src, out = pair
    ref = tensors(transformers_8bit(src, tmp_path / "ref"))
    got = tensors(out)
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert sum(n.endswith(".SCB") for n in got) > 0
    if arch in ("t5", "mt5"):  # _keep_in_fp32_modules: wo stays in full precision
        assert all(got[n].dtype == torch.float32 for n in got if n.endswith("DenseReluDense.wo.weight"))
        assert not any(n.endswith("wo.SCB") for n in got)


def test_config_equals_transformers(pair, tmp_path):
    """quantization_config equals what transformers writes given the same skip list, and that list names
    exactly the linears transformers' defaults keep (its own run without a list quantizes the same layers)."""
    arch, src, out = pair
    qc = quantization_config(out)
    skip = qc["llm_int8_skip_modules"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] is True and qc["llm_int8_threshold"] == 6.0
    ref = transformers_8bit(src, tmp_path / "ref", skip_modules=skip)
    assert qc == quantization_config(ref)
    assert tensors(ref).keys() == tensors(out).keys()
    kept = {n.removesuffix(".weight") for n, t in tensors(out).items() if n.endswith(".weight") and t.ndim == 2
            and t.dtype != torch.int8}
    assert "lm_head" in skip and set(skip) - {"lm_head"} <= kept  # a tied head (BLOOM, GPT-2) is not written
    report = json.loads((out / "int8_report.json").read_text())
    assert report["quantization"]["format"].startswith("bitsandbytes")
    assert report["quantization"]["scale_dtype"] == "float32"


# --------------------------------------------------------------------------- stock transformers


def test_stock_from_pretrained_builds_linear8bitlt_and_generates(pair):
    arch, src, out = pair
    model = model_class(out).from_pretrained(out, device_map="cpu").eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == sum(n.endswith(".SCB") for n in tensors(out))
    assert all(m.weight.dtype == torch.int8 for m in layers)
    ids = torch.tensor([[5, 17, 99, 200, 3]])
    kwargs = {"decoder_input_ids": torch.tensor([[0, 5]])} if arch in ("t5", "mt5") else {}
    original = model_class(src).from_pretrained(src).eval()
    with torch.no_grad():
        got, want = model(ids, **kwargs).logits, original(ids, **kwargs).logits
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] >= (5 if arch not in ("t5", "mt5") else 2)
    assert torch.isfinite(got).all()
    # int8 weights and fp16 activations: close to the original, not equal
    assert (got - want).abs().max() < 0.25 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.5


def test_default_dtype_bf16_loads(tmp_path):
    """With the default --dtype (bf16 for the tensors kept), stock transformers loads and generates."""
    src = make_tiny("gptj", tmp_path / "fp32")
    out = tmp_path / "bnb"
    int8.convert(src, out, format="bnb", device="cpu")
    got = tensors(out)
    assert got["transformer.wte.weight"].dtype == torch.bfloat16 and got["lm_head.weight"].dtype == torch.bfloat16
    model = model_class(out).from_pretrained(out, device_map="cpu").eval()
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_skip_is_kept_and_named(tmp_path):
    src = make_tiny("gptj", tmp_path / "fp32")
    out = tmp_path / "bnb"
    int8.convert(src, out, format="bnb", dtype="fp32", device="cpu", skip=["mlp.fc_out"])
    skip = quantization_config(out)["llm_int8_skip_modules"]
    assert skip == sorted(["lm_head", "transformer.h.0.mlp.fc_out", "transformer.h.1.mlp.fc_out"])
    model = model_class(out).from_pretrained(out, device_map="cpu")
    assert type(model.transformer.h[0].mlp.fc_out) is torch.nn.Linear
    assert isinstance(model.transformer.h[0].mlp.fc_in, bnb.nn.Linear8bitLt)


def test_peft_kbit_lora_trains(tmp_path):
    """PEFT's prepare_model_for_kbit_training + LoRA on the stock-loaded 8-bit model: the loss goes down."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    out = tmp_path / "bnb"
    int8.convert(make_tiny("gptj", tmp_path / "fp32"), out, format="bnb", device="cpu")
    torch.manual_seed(0)
    model = model_class(out).from_pretrained(out, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    assert isinstance(model.base_model.model.transformer.h[0].attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.9, losses


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("args", [["--block-size", "64", "--format", "bnb"], ["--format", "bnb", "--block-size", "64"]])
def test_block_size_refused_with_bnb(capsys, tmp_path, args):
    from test_hub_download import run_main

    code, out, err = run_main(capsys, "convert", str(tmp_path / "nothing-here"), *args)
    assert code == 2
    assert "--block-size does not apply to --format bnb" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_library_refuses_what_does_not_apply(tmp_path):
    with pytest.raises(UsageError, match="--block-size does not apply"):
        int8.convert(tmp_path / "x", tmp_path / "y", format="bnb", block_size=64)
    with pytest.raises(UsageError, match="--scale-dtype does not apply"):
        int8.convert(tmp_path / "x", tmp_path / "y", format="bnb", scale_dtype="bf16")
    with pytest.raises(UsageError, match="not a format"):
        int8.convert(tmp_path / "x", tmp_path / "y", format="gguf")


# --------------------------------------------------------------------------- the Hub


def test_convert_bnb_and_push_round_trip(hub, tmp_path):
    """`int8 convert alice/tiny --format bnb --push alice/tiny-8bit` against the test Hub: the download is the
    local output, its card says bitsandbytes, and stock transformers loads it from the Hub into Linear8bitLt."""
    import subprocess

    import transformers as tf
    from huggingface_hub import ModelCard, snapshot_download
    from test_card import ORIGINAL_CARD, python_blocks
    from test_hub_download import INT8, folder_files
    from test_push import read_tree

    src = make_tiny("gptj", tmp_path / "fp32")
    hub.create_repo("alice/tiny", {**folder_files(src), "README.md": ORIGINAL_CARD})
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([*INT8, "convert", "alice/tiny", "--format", "bnb", "--push", "alice/tiny-8bit"], cwd=work,
                       env=hub.env(user="alice", PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = work / "tiny-int8"
    fresh = Path(snapshot_download("alice/tiny-8bit", cache_dir=tmp_path / "fresh-cache"))
    got = read_tree(fresh)
    got.pop(".gitattributes")
    assert got == read_tree(out)
    card = ModelCard.load(fresh / "README.md")
    assert "bitsandbytes" in card.data.to_dict()["tags"] and "compressed-tensors" not in card.data.to_dict()["tags"]
    assert "prepare_model_for_kbit_training" in card.text and "outlier" in card.text

    model = tf.AutoModelForCausalLM.from_pretrained("alice/tiny-8bit", device_map="cpu").eval()
    assert isinstance(model.transformer.h[0].attn.q_proj, bnb.nn.Linear8bitLt)
    local = tf.AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    ids = torch.tensor([[5, 17, 99, 200, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, local(ids).logits)
    snippet = python_blocks(card.text)[0]
    assert '"alice/tiny-8bit"' in snippet
    scope: dict = {}
    exec(compile(snippet.replace("max_new_tokens=32", "max_new_tokens=4"), "card-snippet", "exec"), scope)
    assert isinstance(scope["model"], tf.GPTJForCausalLM)


def test_embeddings_int8_refused_with_bnb(tmp_path):
    """--embeddings int8 quantizes embeddings in compressed-tensors' layout only: with --format bnb it is a usage
    error, said before anything is read, whichever option comes first."""
    import subprocess
    import sys

    for args in (["--format", "bnb", "--embeddings", "int8"], ["--embeddings", "int8", "--format", "bnb"]):
        r = subprocess.run([sys.executable, "-m", "int8.cli", "convert", str(tmp_path / "missing"), *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert "--embeddings int8 does not apply to --format bnb" in " ".join(r.stderr.split())
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "missing-int8").exists()
