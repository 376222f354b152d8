"""`int8 verify` on checkpoints other tools wrote, and on int8's own with its marks removed.

The foreign checkpoints are llm-compressor's W8A16 (`model_free_ptq`), made
with compressed-tensors' own compressor (tests/foreign.py): codes in
[-128, 127], scales absmax/127.5, no int8_report.json, no card. Sound ones
pass on the checks that apply to them; damage still fails, because the
numbers checks compare every value with the original; other schemes get
"not an 8-bit weight-only checkpoint" instead of a verdict; int8's own
output cannot pass as another tool's to escape its checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from foreign import make_foreign, quantization_config
from models import make_tiny
from safetensors import safe_open
from test_verify import BLOCK, FULL, INT8, STRUCTURE, TOKENS, beside, failed, header, offset, patch, rewrite

import int8
from int8.errors import Int8Error
from int8.hub.upload import push
from int8.verify import Thresholds, verify_checkpoint
from int8.verify.provenance import Provenance, read_origin
from int8.verify.scheme import NOT_W8, OTHER_W8, unsupported_scheme

SHARD = "model.safetensors"
INT8_ONLY = ("report", "sha256", "files", "card")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny originals, each built once: ``sources(arch)`` (``arch`` may end in ``-bf16``)."""
    root = tmp_path_factory.mktemp("foreign-src")
    built = {}

    def get(arch: str):
        if arch not in built:
            name, _, dtype = arch.partition("-")
            built[arch] = make_tiny(name, root / arch, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        return built[arch]

    return get


@pytest.fixture
def foreign(sources, tmp_path):
    """``foreign(arch, **kw)``: a fresh checkpoint another tool wrote from ``sources(arch)``, and its original."""

    def make(arch: str = "gptj", **kwargs):
        src = sources(arch)
        return make_foreign(src, tmp_path / f"{arch}-w8a16", **kwargs), src

    return make


def run(folder, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("max_tokens", TOKENS)
    kwargs.setdefault("save", False)
    return verify_checkpoint(folder, **kwargs)


def codes_and_scales(folder, module: str):
    with safe_open(folder / SHARD, "pt") as f:
        packed, scale = f.get_tensor(f"{module}.weight_packed"), f.get_tensor(f"{module}.weight_scale")
    return (packed.view(torch.uint8) ^ 0x80).view(torch.int8), scale


# --------------------------------------------------------------------------- sound checkpoints pass


@pytest.mark.parametrize("arch", ["gptj", "t5", "bloom", "gptj-bf16"])
def test_w8a16_checkpoint_verifies(arch, foreign):
    folder, src = foreign(arch)
    assert read_origin(folder).provenance is Provenance.FOREIGN
    qc = quantization_config(folder)
    assert qc["format"] == "pack-quantized" and not (folder / "int8_report.json").exists()
    assert next(iter(qc["config_groups"].values()))["weights"]["group_size"] == 128

    result = run(folder, against=str(src))
    assert result.passed, failed(result)
    assert [c.name for c in result.checks] == FULL
    assert result.provenance == "foreign" and result.unsupported is None and result.manifest_sha256 is None
    for name in INT8_ONLY:
        c = result.check(name)
        assert c.status == "skip" and "not written by int8" in c.figure, c
    for name in FULL:
        if name not in INT8_ONLY:
            assert result.check(name).status == "pass", result.check(name)
    assert "scales not held to absmax/127" in result.check("reconstruction").threshold
    m = result.metrics
    assert m["mean_kl"] <= Thresholds().kl_factor * m["mean_kl_reference"]
    if arch.endswith("bf16"):  # compressed-tensors divides in bf16: beyond half a scale, within its rounding
        assert 0.5 < m["max_error_scales"] < 1.0
    else:
        assert m["max_error_scales"] <= 0.5 * (1 + 1e-3)


def test_its_own_scale_rule_and_minus_128(foreign):
    """What makes it another tool's: scales absmax/127.5 of the group, and the code -128, both legal here."""
    folder, src = foreign()
    module = "transformer.h.0.mlp.fc_in"
    codes, scale = codes_and_scales(folder, module)
    with safe_open(src / SHARD, "pt") as f:
        w = f.get_tensor(f"{module}.weight")
    absmax = w.reshape(w.shape[0], -1, 128).abs().amax(-1)
    assert torch.allclose(scale, absmax / 127.5, rtol=1e-6)
    assert int((codes == -128).sum()) > 0

    quick = run(folder, quick=True)
    assert quick.passed and [c.name for c in quick.checks] == STRUCTURE
    codes_check = quick.check("codes")
    assert codes_check.status == "pass" and "-128 in" in codes_check.figure and "[-128, 127]" in codes_check.threshold


def test_a_single_file_without_index(foreign):
    """transformers' save_pretrained writes small models as one model.safetensors and no index."""
    folder, src = foreign(index=False)
    assert not (folder / "model.safetensors.index.json").exists()
    result = run(folder, against=str(src))
    assert result.passed, failed(result)
    assert result.check("index").figure.startswith("1 shard(s)")


def test_without_an_original_it_fails_with_the_hint(foreign):
    folder, _ = foreign()
    result = run(folder)
    assert set(failed(result)) == {"original"}
    assert "--against" in failed(result)["original"]
    assert result.check("load").status == "pass"


def test_the_verify_record_is_no_mark_of_int8(foreign):
    folder, src = foreign()
    assert run(folder, against=str(src), save=True).passed
    assert (folder / "int8_verify.json").is_file()
    assert read_origin(folder).provenance is Provenance.FOREIGN
    assert run(folder, quick=True).passed


# --------------------------------------------------------------------------- damage still fails


def test_flipped_code_byte(foreign):
    folder, src = foreign()
    tensor = "transformer.h.1.mlp.fc_in.weight_packed"
    h, _ = header(folder / SHARD)
    at = offset(folder / SHARD, tensor) + (h[tensor]["data_offsets"][1] - h[tensor]["data_offsets"][0]) // 2 + 1
    old = (folder / SHARD).read_bytes()[at]
    patch(folder / SHARD, at, bytes([old ^ 0x01]))  # one code off by one

    assert run(folder, quick=True).passed  # no manifest: only the original can tell
    problems = failed(run(folder, against=str(src)))
    assert set(problems) == {"reconstruction"}, problems
    assert f"{SHARD}: {tensor}" in problems["reconstruction"] and "beyond half a scale" in problems["reconstruction"]


def test_a_block_of_codes_changed(foreign):
    """The first group of every row of one layer negated: structurally sound, numerically wrong."""
    folder, src = foreign()
    tensor = "transformer.h.0.attn.q_proj.weight_packed"

    def negate(t):
        codes = (t[tensor].view(torch.uint8) ^ 0x80).view(torch.int8).clone()
        codes[:, :128] = -codes[:, :128].clamp(min=-127)
        t[tensor] = (codes.view(torch.uint8) ^ 0x80).view(torch.int32)
        return t

    rewrite(folder / SHARD, negate)
    problems = failed(run(folder, against=str(src)))
    assert "reconstruction" in problems and tensor in problems["reconstruction"], problems


@pytest.mark.parametrize("arch", ["gptj", "t5", "gptj-bf16"])
def test_doubled_scales(arch, foreign):
    folder, src = foreign(arch)
    rewrite(folder / SHARD, lambda t: {k: v * 2 if k.endswith(".weight_scale") else v for k, v in t.items()})
    assert run(folder, quick=True).passed

    result = run(folder, against=str(src))
    problems = failed(result)
    assert {"reconstruction", "kl"} <= set(problems) <= {"reconstruction", "top1", "kl", "perplexity"}, problems
    assert "beyond half a scale" in problems["reconstruction"] and "absmax/127" not in problems["reconstruction"]
    assert result.metrics["mean_kl"] > 30 * Thresholds().kl_factor * result.metrics["mean_kl_reference"]


# --------------------------------------------------------------------------- other schemes are not judged


@pytest.mark.parametrize(("scheme", "said"), [
    ("W4A16", "4-bit int weights in groups of 128, format pack-quantized"),
    ("W8A8", "input activations quantized (8-bit int), format int-quantized"),
    ("FP8_DYNAMIC", "8-bit float weights per output channel"),
])
def test_other_schemes_get_a_clear_result(scheme, said, foreign):
    folder, src = foreign(scheme=scheme)
    result = run(folder, against=str(src))
    assert not result.passed and result.unsupported.startswith(f"{NOT_W8}: ") and said in result.unsupported
    assert set(failed(result)) == {"config"} and failed(result)["config"] == result.unsupported
    assert [c.name for c in result.checks] == FULL
    assert all(c.status == "skip" for c in result.checks if c.name not in ("contained", "config"))


def test_cli_exit_code_and_json_of_an_unsupported_scheme(foreign, tmp_path):
    folder, src = foreign(scheme="W4A16")
    out = tmp_path / "result.json"
    done = subprocess.run([str(INT8), "verify", str(folder), "--against", str(src), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "NOT CHECKED: not an 8-bit weight-only checkpoint: 4-bit int weights" in " ".join(done.stderr.split())
    data = json.loads(out.read_text())
    assert not data["passed"] and data["provenance"] == "foreign" and data["unsupported"].startswith(NOT_W8)


def test_schemes_in_words():
    from int8.formats.compressed_tensors import build_config

    own = {"quantization_config": build_config({128: ["transformer.h.0.attn.q_proj"]}, ["lm_head"])}
    assert unsupported_scheme(own) == ""
    assert unsupported_scheme({}) == f"{NOT_W8}: config.json has no quantization_config (the weights are not quantized)"
    assert unsupported_scheme({"quantization_config": {"quant_method": "gptq", "bits": 4}}).startswith(
        f"{NOT_W8}: quant_method 'gptq'")
    for change, said in [({"symmetric": False}, "asymmetric (zero points)"), ({"strategy": "channel"}, "per output channel"),
                         ({"actorder": "group"}, "activation order 'group'")]:
        qc = json.loads(json.dumps(own))
        qc["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
        found = unsupported_scheme(qc)
        assert found.startswith(f"{OTHER_W8}: 8-bit int weights ") and said in found, found
    kv = json.loads(json.dumps(own))
    kv["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float"}
    found = unsupported_scheme(kv)
    assert found.startswith(f"{NOT_W8}: 8-bit int weights in groups of 128") and "KV cache quantized" in found


# --------------------------------------------------------------------------- int8's own output keeps its checks


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("foreign-own") / "gptj-int8"
    int8.convert(sources("gptj"), out, block_size=BLOCK, device="cpu")
    return out


@pytest.fixture
def own(converted, sources, tmp_path):
    folder = tmp_path / converted.name
    shutil.copytree(converted, folder)
    beside(sources("gptj"), folder)
    return folder


def test_int8_card_is_a_mark(own):
    origin = read_origin(own)
    assert origin.own and origin.marks == ("int8_report.json", "README.md (int8's model card)")


def test_removed_report_fails(own):
    """The card says int8 wrote it: a missing report is damage, and every strict check stays."""
    (own / "int8_report.json").unlink()
    assert read_origin(own).report_removed
    result = run(own, quick=True)
    assert result.provenance == "int8"
    problems = failed(result)
    assert {"report", "sha256", "files"} <= set(problems), problems
    assert "README.md (int8's model card) says int8 wrote this folder" in problems["report"]
    assert "was removed" in problems["report"]


def test_damage_behind_removed_marks_still_fails(own, sources):
    """With the report and the card both deleted it reads as another tool's checkpoint: the manifest's
    guarantee is gone, but the numbers are still compared with the original, so damage does not pass."""
    for name in ("int8_report.json", "README.md", "int8_verify.json"):
        (own / name).unlink(missing_ok=True)
    assert read_origin(own).provenance is Provenance.FOREIGN
    shard = next(own.glob("model-*.safetensors"))
    clean = run(own, against=str(sources("gptj")))
    assert clean.passed and clean.provenance == "foreign", failed(clean)  # int8's rounding is within any tool's rule

    tensor = "transformer.h.0.mlp.fc_out.weight_packed"
    patch(shard, offset(shard, tensor) + 3, b"\x00")  # a code of -128: legal for another tool's checkpoint...
    assert run(own, quick=True).passed
    problems = failed(run(own, against=str(sources("gptj"))))
    assert set(problems) == {"reconstruction"} and tensor in problems["reconstruction"]  # ...but not that value


# --------------------------------------------------------------------------- push publishes int8's own only


def test_push_refuses_another_tools_checkpoint(foreign, hub):
    folder, _ = foreign()
    with pytest.raises(Int8Error, match="was not written by `int8 convert`.*int8's own conversions only") as e:
        push(folder, "alice/foreign", token=hub.tokens.alice)
    assert "hf upload" in e.value.hint and "--against" in e.value.hint
    assert ("model", "alice/foreign") not in hub.repos and hub.log.count(kind="create-repo") == 0


def test_push_refuses_before_asking_for_a_token(foreign):
    folder, _ = foreign()
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    done = subprocess.run([str(INT8), "push", str(folder), "--repo", "alice/foreign"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2 and "was not written by `int8 convert`" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "token" not in done.stderr.lower()
