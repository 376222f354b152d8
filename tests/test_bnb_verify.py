"""`int8 verify` on bitsandbytes 8-bit checkpoints (`int8 convert --format bnb`): clean conversions pass every
check; each kind of damage tests/test_verify.py catches for compressed-tensors is caught here too, and named.

Transformers' own ``save_pretrained`` of a ``load_in_8bit`` model (another tool's checkpoint: no report)
passes the structure checks that apply to it.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from models import make_tiny, refresh_manifest
from test_verify import FULL, STRUCTURE, beside, failed, header, offset, patch, rewrite

import int8
from int8.errors import UnsupportedModel
from int8.verify import Thresholds, verify_checkpoint

pytest.importorskip("bitsandbytes")

TOKENS = 256
SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture(scope="session")
def bnb_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb-verify")
    built: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in built:
            src = make_tiny(arch, root / arch)
            out = root / f"{arch}-int8"
            int8.convert(src, out, format="bnb", device="cpu")
            built[arch] = (src, out)
        return built[arch]

    return get


@pytest.fixture
def damaged(bnb_tiny, tmp_path):
    def copy(arch: str = "gptj") -> Path:
        src, clean = bnb_tiny(arch)
        out = tmp_path / f"{arch}-int8"
        shutil.copytree(clean, out)
        beside(src, out)
        return out

    return copy


def run(folder, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("max_tokens", TOKENS)
    return verify_checkpoint(folder, **kwargs)


@pytest.mark.parametrize("arch", ["gptj", "bloom", "t5", "mt5", "gpt2"])
def test_clean_conversion_passes(arch, damaged):
    folder = damaged(arch)
    result = run(folder)
    assert result.passed, failed(result)
    assert [c.name for c in result.checks] == FULL
    assert {c.status for c in result.checks} == {"pass"}
    m = result.metrics
    assert 0.45 < m["max_error_scales"] <= 0.5 * (1 + 1e-3)  # half a row step of the float16 weight, reached
    assert 0 < m["mean_kl"] <= 3 * m["mean_kl_reference"]
    assert abs(m["ppl_ratio"] - 1) < 0.05
    assert "Linear8bitLt" in result.check("load").figure
    assert "through Linear8bitLt; LLM.int8 at run time: KL" in result.check("forward").figure
    assert "row scales (SCB)" in result.check("scales").figure


def test_transformers_own_save_passes_structure(tmp_path):
    """transformers' load_in_8bit + save_pretrained (one model.safetensors, no report): every structure check
    that applies to another tool's checkpoint passes."""
    import transformers as tf
    from transformers import BitsAndBytesConfig

    src = make_tiny("gptj", tmp_path / "fp32")
    out = tmp_path / "theirs"
    model = tf.GPTJForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    model.save_pretrained(out)
    tf.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    result = run(out, quick=True)
    assert result.passed, failed(result)
    assert result.provenance == "foreign"
    statuses = {c.name: c.status for c in result.checks}
    assert all(statuses[n] == "pass" for n in ("config", "index", "tensors", "codes", "scales", "finite"))


# --------------------------------------------------------------------------- damage


@pytest.mark.parametrize("tensor", ["transformer.h.1.mlp.fc_in.weight", "transformer.h.0.ln_1.weight"])
def test_flipped_byte(tensor, damaged):
    folder = damaged()
    shard = folder / SHARD
    h, _ = header(shard)
    size = h[tensor]["data_offsets"][1] - h[tensor]["data_offsets"][0]
    at = offset(shard, tensor) + size // 2 + 1
    patch(shard, at, bytes([shard.read_bytes()[at] ^ 0x01]))
    quick = run(folder, quick=True)
    assert "sha256" in failed(quick) and SHARD in failed(quick)["sha256"]
    assert set(failed(quick)) <= {"sha256", "codes"}
    result = run(folder)
    detail = failed(result)["reconstruction"]
    assert SHARD in detail and tensor in detail


def test_truncated_shard(damaged):
    folder = damaged()
    shard = folder / SHARD
    keep = int(shard.stat().st_size * 0.6)
    with open(shard, "r+b") as f:
        f.truncate(keep)
    result = run(folder)
    problems = failed(result)
    assert {"index", "sha256"} <= set(problems)
    assert "truncated" in problems["index"] and f"{SHARD} has {keep} bytes" in problems["sha256"]
    assert all(result.check(n).status == "skip" for n in FULL[len(STRUCTURE):])


def test_tensor_deleted_from_a_shard(damaged):
    folder = damaged()
    gone = "transformer.h.0.attn.q_proj.SCB"
    rewrite(folder / SHARD, lambda t: {k: v for k, v in t.items() if k != gone})
    problems = failed(run(folder, quick=True))
    assert gone in problems["index"] and "not there" in problems["index"]
    assert "transformer.h.0.attn.q_proj.weight holds int8 codes but has no SCB" in problems["tensors"]
    assert SHARD in problems["sha256"]


def test_tensor_deleted_from_the_index(damaged):
    folder = damaged()
    gone = "transformer.h.0.mlp.fc_out.bias"
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    del index["weight_map"][gone]
    path.write_text(json.dumps(index, indent=2))
    problems = failed(run(folder, quick=True))
    assert f"{SHARD} holds tensor {gone!r}, which model.safetensors.index.json does not list" in problems["index"]
    assert "model.safetensors.index.json" in problems["sha256"]


def test_nan_scale(damaged):
    folder = damaged()
    name = "transformer.h.1.attn.v_proj.SCB"
    shard = folder / SHARD
    patch(shard, offset(shard, name) + 3 * 4, struct.pack("<I", 0x7FC00000))  # row 3
    problems = failed(run(folder, quick=True))
    assert set(problems) == {"scales", "sha256"}
    assert f"{SHARD}: {name} has 1 NaN scale(s) (first at row 3)" in problems["scales"]


def test_negative_and_zero_scales(damaged):
    folder = damaged()
    name = "transformer.h.0.attn.k_proj.SCB"
    rewrite(folder / SHARD, lambda t: {**t, name: torch.cat([-t[name][:1], torch.zeros(1), t[name][2:]])})
    refresh_manifest(folder)
    problems = failed(run(folder, quick=True))
    assert set(problems) == {"scales"}
    assert "1 negative scale(s) (first at row 0)" in problems["scales"]
    assert "1 row(s) with SCB 0 but codes that are not all 0 (first row 1)" in problems["scales"]


def test_code_of_minus_128(damaged):
    folder = damaged()
    name = "transformer.h.0.mlp.fc_out.weight"
    shard = folder / SHARD
    h, _ = header(shard)
    rows, cols = h[name]["shape"]
    patch(shard, offset(shard, name) + 5 * cols + 7, b"\x80")
    problems = failed(run(folder, quick=True))
    assert set(problems) == {"codes", "sha256"}
    assert f"{SHARD}: {name} holds 1 code(s) of -128 (first at row 5, column 7)" in problems["codes"]


def test_row_without_its_peak(damaged):
    """Codes halved in one row (a converter that got the scale wrong): no code of the row reaches 127."""
    folder = damaged()
    name = "transformer.h.0.attn.q_proj.weight"
    rewrite(folder / SHARD, lambda t: {**t, name: torch.cat([t[name][:2], t[name][2:3] // 2, t[name][3:]])})
    refresh_manifest(folder)
    problems = failed(run(folder, quick=True))
    assert set(problems) == {"codes"}
    assert "1 row(s) whose largest |code| is not 127 (first row 2" in problems["codes"]


def test_weight_shape_disagrees_with_config(damaged):
    folder = damaged()
    module = "transformer.h.0.mlp.fc_in"

    def cut(t):
        for suffix in ("weight", "SCB", "bias"):
            t[f"{module}.{suffix}"] = t[f"{module}.{suffix}"][:500].clone()
        return t

    rewrite(folder / SHARD, cut)
    refresh_manifest(folder)
    result = run(folder)
    detail = failed(result)["tensors"]
    assert f"{SHARD}: {module}.weight is I8 [500, 128]" in detail and "int8 [512, 128]" in detail
    assert f"{module}.bias has shape [500]" in detail
    assert result.check("load").status == "skip"


def test_config_skips_a_quantized_layer(damaged):
    """llm_int8_skip_modules naming a layer stored quantized (transformers would load its codes as weights), and
    a quantization_config that is not load_in_8bit."""
    folder = damaged()
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"]["llm_int8_skip_modules"].append("transformer.h.0.attn.q_proj")
    path.write_text(json.dumps(cfg))
    problems = failed(run(folder, quick=True))
    assert "skips transformer.h.0.attn.q_proj" in problems["config"] and "config.json" in problems["sha256"]
    cfg["quantization_config"]["llm_int8_skip_modules"] = []  # lm_head no longer skipped: transformers would convert it
    cfg["quantization_config"]["load_in_8bit"] = False
    path.write_text(json.dumps(cfg))
    problems = failed(run(folder, quick=True))
    assert "load_in_8bit is False, not True" in problems["config"]
    assert "transformers would convert lm_head to Linear8bitLt" in problems["config"]


def test_weight_format_not_row(damaged):
    folder = damaged()
    name = "transformer.h.1.attn.q_proj.weight_format"
    patch(folder / SHARD, offset(folder / SHARD, name), b"\x01")
    problems = failed(run(folder, quick=True))
    assert f"{name} is 1, not 0" in problems["scales"]


def test_missing_tokenizer(damaged):
    folder = damaged()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    problems = failed(run(folder, quick=True))
    assert set(problems) == {"tokenizer", "sha256"}


def test_report_of_another_format(damaged):
    folder = damaged()
    report = json.loads((folder / "int8_report.json").read_text())
    report["quantization"]["format"] = "compressed-tensors pack-quantized"
    (folder / "int8_report.json").write_text(json.dumps(report))
    assert "config.json says bitsandbytes" in failed(run(folder, quick=True))["report"]


@pytest.mark.parametrize("arch", ["gptj", "t5"])
def test_doubled_scales_pass_structure_but_fail_fidelity(arch, damaged):
    """SCB doubled (still float16 values, codes untouched): structurally perfect, numerically wrong."""
    folder = damaged(arch)
    rewrite(folder / SHARD, lambda t: {k: v * 2 if k.endswith(".SCB") else v for k, v in t.items()})
    refresh_manifest(folder)
    assert run(folder, quick=True).passed
    result = run(folder)
    problems = failed(result)
    assert {"reconstruction", "kl"} <= set(problems), problems
    assert "not the absmax of the float16 row" in problems["reconstruction"]
    assert "beyond half a row step" in problems["reconstruction"]
    assert result.metrics["mean_kl"] > 30 * Thresholds().kl_factor * result.metrics["mean_kl_reference"]


def test_int8_load_says_compressed_tensors_only(bnb_tiny):
    _, folder = bnb_tiny("gptj")
    with pytest.raises(UnsupportedModel, match="bitsandbytes' 8-bit layout.*compressed-tensors checkpoints only"):
        int8.load(folder)
