"""A block size per layer: the largest of --block-size and the fallbacks 64, 32 that divides its input width.

The tiny Llama of tests/models.py has SmolLM2-like widths that 128 does not divide (96 and 192) beside one
it does (128), so a conversion with --block-size 128 writes three compressed-tensors config groups (the
default, 32, divides every width: one group). Stock transformers
must load it with every layer in its own group, giving the logits of int8's own decoding; `int8.load`
likewise; verify passes it and faults a layer whose scales are cut in blocks other than its group's.
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
from int8.blocks import block_candidates, choose_block
from int8.formats.compressed_tensors import check_config, matching_groups, pack_codes, unpack_codes
from int8.hub.card import card_text
from int8.quantize import dequantize, quantize
from int8.report import ConversionReport
from int8.runtime.layer import Int8Linear
from int8.verify import verify_checkpoint

SHARD = "model-00001-of-00001.safetensors"
TOKENS = 48
# in_features of each linear of the tiny Llama, and the block it gets with --block-size 128
WIDTHS = {"q_proj": 96, "k_proj": 96, "v_proj": 96, "o_proj": 128, "gate_proj": 96, "up_proj": 96, "down_proj": 192}
BLOCKS_AT_128 = {"q_proj": 32, "k_proj": 32, "v_proj": 32, "o_proj": 128, "gate_proj": 32, "up_proj": 32, "down_proj": 64}
INPUT = torch.tensor([[1, 40, 77, 5, 120, 9, 33, 250, 61, 2, 18, 99]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    """(source, conversion with --block-size 128 and everything unquantized in fp32: three block sizes)."""
    root = tmp_path_factory.mktemp("mixed")
    src = make_tiny("llama", root / "llama")
    out = root / "llama-int8"
    int8.convert(src, out, block_size=128, dtype="fp32", device="cpu")
    return src, out


def _proj(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / SHARD, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _int8_decoded(src: Path, out: Path, report: ConversionReport):
    """The original model with every quantized weight replaced by int8's own decoding of the stored codes."""
    model = load_original(src)
    state = _state(out)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for t in report.quantized:
            module = t.name.removesuffix(".weight")
            codes = unpack_codes(state[f"{module}.weight_packed"], t.shape[1])
            params[t.name].copy_(dequantize(codes, state[f"{module}.weight_scale"], t.block_size, torch.float32))
    return model


# --------------------------------------------------------------------------- the rule


def test_block_rule():
    assert block_candidates(128) == (128, 64, 32)
    assert block_candidates(64) == (64, 32)
    assert block_candidates(32) == (32,)
    assert block_candidates(256) == (256, 128, 64, 32)
    assert block_candidates(48) == (48, 32)
    assert [choose_block(w, 128) for w in (1536, 576, 96, 100)] == [128, 64, 32, None]
    assert choose_block(576, 32) == 32 and choose_block(96, 48) == 48


# --------------------------------------------------------------------------- convert


def test_every_linear_quantized_in_one_group_per_block(llama):
    src, out = llama
    report = ConversionReport.load(out)
    linears = [t for t in report.tensors if _proj(t.name.removesuffix(".weight")) in WIDTHS]
    assert len(linears) == 14 and all(t.action == "quantized" for t in linears)
    assert {_proj(t.name.removesuffix(".weight")): t.block_size for t in linears} == BLOCKS_AT_128
    for t in linears:
        assert t.blocks == t.shape[0] * t.shape[1] // t.block_size
    assert not any("kept unquantized" in w for w in report.warnings)
    assert report.quantization.block_size == 128
    groups = [(g.block_size, g.layers, g.input_widths) for g in report.quantization.block_groups]
    assert groups == [(128, 2, [128]), (64, 2, [192]), (32, 10, [96])]
    raw = json.loads((out / "int8_report.json").read_text())
    assert raw["quantization"]["block_groups"][1] == {"block_size": 64, "layers": 2, "input_widths": [192]}
    assert {t["name"]: t["block_size"] for t in raw["tensors"] if t["action"] == "quantized"}[
        "model.layers.1.mlp.down_proj.weight"] == 64

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    by_size = {g["weights"]["group_size"]: sorted(g["targets"]) for g in qc["config_groups"].values()}
    assert list(by_size) == [128, 64, 32]
    for size, targets in by_size.items():
        assert targets == sorted(t.name.removesuffix(".weight") for t in linears if t.block_size == size)
    assert qc["ignore"] == ["lm_head"]  # tied to the embeddings, kept
    assert check_config(qc).problems == ()
    scales = _state(out)
    assert scales["model.layers.0.self_attn.q_proj.weight_scale"].shape == (128, 3)
    assert scales["model.layers.0.self_attn.o_proj.weight_scale"].shape == (96, 1)
    assert scales["model.layers.0.mlp.down_proj.weight_scale"].shape == (96, 3)


@pytest.mark.parametrize(("block", "sizes"), [(64, [64, 32]), (32, [32])])
def test_block_size_sets_the_largest(llama, tmp_path, block, sizes):
    src, _ = llama
    report = int8.convert(src, tmp_path / "out", block_size=block, dtype="fp32", device="cpu")
    assert [g.block_size for g in report.quantization.block_groups] == sizes
    blocks = {_proj(t.name.removesuffix(".weight")): t.block_size for t in report.quantized}
    assert blocks == {p: choose_block(w, block) for p, w in WIDTHS.items()}
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    if len(sizes) == 1:  # one block size: one group for every Linear, as before
        assert [g["targets"] for g in qc["config_groups"].values()] == [["Linear"]]
    else:
        assert all("Linear" not in g["targets"] for g in qc["config_groups"].values())


def test_default_is_one_group_of_32(llama, tmp_path):
    """The default preferred block (README: 32) divides every width of the tiny Llama: one group for every Linear."""
    src, _ = llama
    report = int8.convert(src, tmp_path / "out", dtype="fp32", device="cpu")
    assert report.quantization.block_size == 32
    assert [(g.block_size, g.layers) for g in report.quantization.block_groups] == [(32, 14)]
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert [(g["targets"], g["weights"]["group_size"]) for g in qc["config_groups"].values()] == [(["Linear"], 32)]


@pytest.mark.parametrize(("block", "group"), [(None, 32), (128, 128)])
def test_a_uniform_model_keeps_one_linear_group(tmp_path, block, group):
    src = make_tiny("gptj", tmp_path / "gptj")
    int8.convert(src, tmp_path / "out", block_size=block, device="cpu")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert list(qc["config_groups"]) == ["group_0"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == group


# --------------------------------------------------------------------------- load


def test_stock_transformers_loads_it_with_int8s_weights(llama):
    from transformers import AutoModelForCausalLM

    src, out = llama
    report = ConversionReport.load(out)
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    schemes = {n: m.quantization_scheme.weights.group_size for n, m in model.named_modules()
               if getattr(m, "quantization_scheme", None) is not None}
    assert schemes == {t.name.removesuffix(".weight"): t.block_size for t in report.quantized}
    reference = _int8_decoded(src, out, report)
    with torch.no_grad():
        got, want = model.eval()(INPUT).logits, reference(INPUT).logits
        original = load_original(src)(INPUT).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert (got - original).abs().max() > 1e-4  # the weights are quantized: they are not the original's


def test_int8_load_runs_every_block_size(llama):
    src, out = llama
    report = ConversionReport.load(out)
    model = int8.load(out, device="cpu", dtype="fp32")
    blocks = {n: m.block_size for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert blocks == {t.name.removesuffix(".weight"): t.block_size for t in report.quantized}
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT).logits, _int8_decoded(src, out, report)(INPUT).logits, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------- verify


def _copy(llama, tmp_path) -> Path:
    src, clean = llama
    out = tmp_path / clean.name
    shutil.copytree(clean, out)
    (tmp_path / src.name).symlink_to(src.resolve(), target_is_directory=True)  # where verify looks for the original
    return out


def _failed(result) -> dict[str, str]:
    return {c.name: c.detail for c in result.checks if c.status == "fail"}


def test_verify_passes_a_mixed_block_checkpoint(llama, tmp_path):
    out = _copy(llama, tmp_path)
    result = verify_checkpoint(out, device="cpu", max_tokens=TOKENS)
    assert result.passed, _failed(result)
    assert "group sizes 128 (2 layers), 64 (2 layers), 32 (10 layers)" in result.check("config").figure
    assert result.check("reconstruction").value <= 0.5
    assert result.check("load").status == "pass"


def test_verify_faults_scales_in_another_block(llama, tmp_path):
    """o_proj re-quantized, consistently, in blocks of 64 while its group says 128: the scale shape gives it away."""
    out = _copy(llama, tmp_path)
    module = "model.layers.0.self_attn.o_proj"
    state = _state(out)
    w = dequantize(unpack_codes(state[f"{module}.weight_packed"], 128), state[f"{module}.weight_scale"], 128)
    q = quantize(w, 64)
    state[f"{module}.weight_packed"] = pack_codes(q.codes)
    state[f"{module}.weight_scale"] = q.scales
    save_file(state, out / SHARD, metadata={"format": "pt"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 96 * 4  # one more fp32 scale per row
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    refresh_manifest(out)
    problems = _failed(verify_checkpoint(out, quick=True, device="cpu"))
    assert set(problems) == {"tensors"}, problems
    assert (f"{SHARD}: {module}.weight_scale has shape [96, 2], but group size 128 (config.json's group for {module}) "
            "over [96, 128] needs [96, 1]") in problems["tensors"]


def test_verify_faults_a_layer_moved_to_another_group(llama, tmp_path):
    out = _copy(llama, tmp_path)
    module = "model.layers.0.mlp.down_proj"
    cfg = json.loads((out / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    groups["group_1"]["targets"].remove(module)
    groups["group_0"]["targets"].append(module)  # the group of size 128
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    refresh_manifest(out)
    problems = _failed(verify_checkpoint(out, quick=True, device="cpu"))
    assert set(problems) == {"tensors"}, problems
    detail = problems["tensors"]
    assert f"{module}.weight_packed: 192 input features are not a multiple of the group size 128" in detail
    assert f"{module}.weight_scale has shape [96, 3], but group size 128" in detail
    assert f"config.json puts {module} in a group of group size 128, but int8_report.json records block size 64" in detail


def test_verify_faults_a_layer_no_group_targets(llama, tmp_path):
    out = _copy(llama, tmp_path)
    module = "model.layers.1.self_attn.q_proj"
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_2"]["targets"].remove(module)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    refresh_manifest(out)
    problems = _failed(verify_checkpoint(out, quick=True, device="cpu"))
    assert f"no config group of quantization_config targets {module}" in problems["tensors"]


def test_config_groups_checked_each(llama):
    _, out = llama
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    found = check_config(qc)
    assert found.group_sizes == (128, 64, 32) and not found.problems
    g0 = qc["config_groups"]["group_0"]
    # a module named by two groups of different sizes: loaders may disagree, and verify says so
    both = {**qc, "config_groups": {**qc["config_groups"], "group_0": {**g0, "targets": [*g0["targets"], "Linear"]}}}
    groups = check_config(both).groups
    assert [g.group_size for g in matching_groups("model.layers.0.self_attn.q_proj", ("Linear",), groups)] == [32, 128]
    empty = {**qc, "config_groups": {**qc["config_groups"], "group_0": {**g0, "targets": []}}}
    assert any("not a non-empty list" in p for p in check_config(empty).problems)
    dup = {**qc, "config_groups": {**qc["config_groups"], "group_0": {**g0, "targets": ["model.layers.0.mlp.up_proj"]}}}
    assert any("is in 'group_0' (group size 128) and in 'group_2' (group size 32)" in p for p in check_config(dup).problems)


def test_verify_faults_a_layer_two_groups_target(llama, tmp_path):
    out = _copy(llama, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["targets"].append("re:.*\\.q_proj$")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    refresh_manifest(out)
    problems = _failed(verify_checkpoint(out, quick=True, device="cpu"))
    assert "model.layers.0.self_attn.q_proj is targeted by config groups of group sizes [128, 32]" in problems["tensors"]


# --------------------------------------------------------------------------- the card


def test_card_names_the_blocks(llama):
    _, out = llama
    text = card_text(out, ConversionReport.load(out))
    assert "one absmax scale per block of 128, 64 or 32 values" in text
    assert ("in blocks of 128, 64 or 32 consecutive input values (the largest of 128, 64, 32 that divides the layer's "
            "input width: 128 for 2 layer(s) of input width 128; 64 for 2 layer(s) of input width 192; 32 for 10 "
            "layer(s) of input width 96)") in text
    assert "group size 128, 64 or 32, one config group per size" in text


def test_old_reports_have_one_block(llama):
    """A report written before per-layer blocks: every quantized tensor has the report's block size."""
    _, out = llama
    raw = json.loads((out / "int8_report.json").read_text())
    del raw["quantization"]["block_groups"]
    for t in raw["tensors"]:
        t.pop("block_size", None)
    raw["quantization"]["block_size"] = 64
    report = ConversionReport.from_dict(raw)
    assert {t.block_size for t in report.quantized} == {64}
    assert [(g.block_size, g.layers) for g in report.quantization.block_groups] == [(64, 14)]


def test_convert_summary_shows_the_blocks(llama, tmp_path):
    src, _ = llama
    env = dict(os.environ, COLUMNS="200", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "int8.cli", "convert", str(src), "--out", str(tmp_path / "o"), "--device", "cpu",
                        "--block-size", "128"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "│ blocks │ 128 (2 layers), 64 (2 layers), 32 (10 layers)" in " ".join((r.stdout + r.stderr).split())
