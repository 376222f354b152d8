"""`int8.load` on tiny converted models of every architecture: same logits and generations as
stock transformers, int8 stays int8, LoRA fine-tunes, adapters reload, gradient checkpointing.

Reference models:

* GPT-J and BLOOM: stock transformers + compressed-tensors loading the same folder
  in run-compressed mode (``CompressedTensorsConfig(run_compressed=True)``).
* T5 / mT5: stock transformers cannot build T5-family models in run-compressed
  mode, so they are compared with stock ``run_compressed=False`` (the folder
  de-quantized at load time) instead.
* Every architecture (GPT-2 too, whose Conv1D layers stock cannot load at all):
  the original FP32 model with each quantized weight replaced by ``code * scale``
  read from the checkpoint files ("fake-quantized"), computed here independently.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from models import make_tiny
from safetensors import safe_open

import int8
from int8.errors import CorruptCheckpoint, Int8Error, SourceNotFound, UnsupportedModel
from int8.formats.compressed_tensors import unpack_codes
from int8.runtime import Int8Linear, Int8LoraLinear, adapter_optimizer, load
from int8.runtime.generate import run_generate, stream_generate

T5_FAMILY = {"t5", "mt5"}
STOCK_RUN_COMPRESSED = {"gptj", "bloom"}
BLOCK = 64
TEXT = (Path(__file__).parent.parent / "examples" / "data" / "lighthouse.txt").read_text()
LORA_TARGETS = {"gptj": ["q_proj", "v_proj", "fc_in"], "bloom": ["query_key_value", "dense_h_to_4h"],
                "t5": ["q", "v", "wi_0"], "mt5": ["q", "v"], "gpt2": ["c_attn"]}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Tiny converted checkpoints, built once per (arch, dtype, tied head, scale dtype)."""
    root = tmp_path_factory.mktemp("runtime")
    cache: dict[tuple, tuple[Path, Path]] = {}

    def get(arch: str, dtype: str = "bf16", untied_head: bool = True, scale_dtype: str | None = None) -> tuple[Path, Path]:
        key = (arch, dtype, untied_head, scale_dtype)
        if key not in cache:
            tag = "" if untied_head else "-tied"
            src = root / f"src-{arch}{tag}"
            if not src.exists():
                make_tiny(arch, src, untied_head=untied_head)
            out = root / f"{arch}{tag}-{dtype}-{scale_dtype or 'default'}"
            int8.convert(src, out, block_size=BLOCK, dtype=dtype, device="cpu", scale_dtype=scale_dtype)
            cache[key] = (src, out)
        return cache[key]

    return get


def stock(folder: Path, run_compressed: bool):
    import transformers as tf
    from transformers import CompressedTensorsConfig

    cls = getattr(tf, tf.AutoConfig.from_pretrained(folder).architectures[0])
    return cls.from_pretrained(
        folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=run_compressed)
    ).eval()


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def fake_quantized(src: Path, out: Path):
    """The FP32 original with every tensor replaced by the checkpoint's: quantized weights by code * scale
    (float64 math), kept tensors (stored in the checkpoint dtype) widened back to fp32."""
    import transformers as tf

    cls = getattr(tf, tf.AutoConfig.from_pretrained(src).architectures[0])
    model = cls.from_pretrained(src, dtype=torch.float32).eval()
    tensors = checkpoint_tensors(out)
    modules = dict(model.named_modules())
    state = model.state_dict()
    done = 0
    for key, packed in tensors.items():
        if key in state:
            with torch.no_grad():
                state[key].copy_(packed.to(state[key].dtype))
            continue
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")
        o, i = tensors[name + ".weight_shape"].tolist()
        codes = unpack_codes(packed, i).double()
        scale = tensors[name + ".weight_scale"].double().repeat_interleave(BLOCK, dim=1)[:, :i]
        w = (codes * scale).float()
        mod = modules[name]
        with torch.no_grad():
            mod.weight.copy_(w.T if type(mod).__name__ == "Conv1D" else w)
        done += 1
    assert done > 0
    return model


def ids_for(arch: str, n: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (batch, n), generator=g)


def logits(model, arch: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if arch in T5_FAMILY:
            return model(input_ids=ids, decoder_input_ids=ids[:, :6]).logits.float()
        return model(input_ids=ids).logits.float()


def greedy(model, ids: torch.Tensor, n: int = 10) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)


def sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


# ---------------------------------------------------------------------------------------------
# Loading and inference


@pytest.mark.parametrize("arch,scale_dtype", [(a, None) for a in ("gptj", "bloom", "t5", "mt5", "gpt2")] + [("gptj", "bf16")])
def test_load_builds_int8_layers(arch, scale_dtype, converted):
    _, out = converted(arch, scale_dtype=scale_dtype)
    model = load(out, device="cpu")
    config = json.loads((out / "config.json").read_text())
    header_layers = {k.removesuffix(".weight_packed") for k in checkpoint_tensors(out) if k.endswith(".weight_packed")}
    int8_layers = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert int8_layers == header_layers and int8_layers
    ignored = set(config["quantization_config"]["ignore"])
    for name, module in model.named_modules():
        if name in ignored:
            assert not isinstance(module, Int8Linear)
    # Nothing of the quantized layers is held in float: no `weight`, only int8 codes and small scales.
    for m in model.modules():
        if isinstance(m, Int8Linear):
            # the scales as the headers store them: fp32 by default (--scale-dtype), beside the bf16 rest
            want = torch.bfloat16 if scale_dtype == "bf16" else torch.float32
            assert not hasattr(m, "weight") and m.codes.dtype == torch.int8 and m.scales.dtype == want
    if arch in T5_FAMILY:  # T5 keeps `wo` in fp32 and unquantized (_keep_in_fp32_modules)
        wo = model.encoder.block[0].layer[1].DenseReluDense.wo
        assert type(wo) is torch.nn.Linear and wo.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype,scale_dtype", [("fp32", None), ("bf16", None), ("bf16", "bf16")])
@pytest.mark.parametrize("arch", ["gptj", "bloom", "t5", "mt5"])
def test_logits_equal_stock_transformers(arch, dtype, scale_dtype, converted):
    _, out = converted(arch, dtype, scale_dtype=scale_dtype)
    ids = ids_for(arch)
    ours = logits(load(out, device="cpu"), arch, ids)
    # T5 cannot be built by stock transformers in run-compressed mode: compare with its de-quantized load.
    ref = logits(stock(out, run_compressed=arch in STOCK_RUN_COMPRESSED), arch, ids)
    if dtype == "fp32" or arch in STOCK_RUN_COMPRESSED:
        # Both compute code * scale exactly in fp32: the same numbers up to summation order.
        tol = 1e-5 * max(1.0, ref.abs().max().item())
    else:
        # Stock de-quantizes T5 into bf16 (code * scale rounded to 8 significant bits, up to 2^-9 relative
        # per weight); int8.load keeps the exact fp32 product. Bound: a few bf16 roundings of the logits.
        tol = 2**-6 * ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"{arch}/{dtype}: max |int8.load - stock| = {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("arch", ["gptj", "bloom", "t5", "mt5", "gpt2"])
def test_logits_equal_fake_quantized_original(arch, converted):
    src, out = converted(arch)
    ids = ids_for(arch, seed=1)
    ours = logits(load(out, device="cpu"), arch, ids)
    ref = logits(fake_quantized(src, out), arch, ids)
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() <= tol


@pytest.mark.parametrize("arch", ["gptj", "bloom", "t5"])
def test_generation_identical_to_stock(arch, converted):
    _, out = converted(arch, "fp32" if arch in T5_FAMILY else "bf16")
    ids = ids_for(arch, n=8, batch=2, seed=2)
    ours = greedy(load(out, device="cpu"), ids)
    ref = greedy(stock(out, run_compressed=arch in STOCK_RUN_COMPRESSED), ids)
    assert ours.shape[1] > ids.shape[1]
    assert torch.equal(ours, ref)


def test_bf16_compute_on_cpu(converted):
    _, out = converted("gptj")
    ids = ids_for("gptj")
    ref = logits(load(out, device="cpu"), "gptj", ids)
    model = load(out, device="cpu", dtype="bf16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    got = logits(model, "gptj", ids)
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def test_codes_and_scales_are_the_checkpoint_bytes_and_files_stay_untouched(converted):
    _, out = converted("gptj")
    before = sha(out)
    model = load(out, device="cpu")
    tensors = checkpoint_tensors(out)
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            assert torch.equal(m.codes, unpack_codes(tensors[name + ".weight_packed"], m.in_features))
            assert torch.equal(m.scales.view(torch.int16), tensors[name + ".weight_scale"].view(torch.int16))
    with torch.no_grad():
        model(input_ids=ids_for("gptj"))
    assert sha(out) == before


def test_save_pretrained_round_trips(converted, tmp_path):
    """A model loaded with int8.load saves back to the same checkpoint format (stock loads it too)."""
    _, out = converted("gptj")
    model = load(out, device="cpu")
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "compressed-tensors" and saved["format"] == "pack-quantized"
    ids = ids_for("gptj")
    ref = logits(model, "gptj", ids)
    assert torch.equal(logits(load(tmp_path / "again", device="cpu"), "gptj", ids), ref)
    assert (logits(stock(tmp_path / "again", True), "gptj", ids) - ref).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------
# LoRA


def text_batches(tokenizer, seq: int, batch: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][0]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq - 1, (n, batch), generator=g)
    return [torch.stack([ids[s : s + seq] for s in row.tolist()]) for row in starts]


def lm_loss(model, arch: str, ids: torch.Tensor) -> torch.Tensor:
    if arch in T5_FAMILY:
        half = ids.shape[1] // 2
        return model(input_ids=ids[:, :half].contiguous(), labels=ids[:, half:].contiguous()).loss
    return model(input_ids=ids, labels=ids).loss


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("arch", ["gptj", "t5", "bloom"])
def test_lora_finetune_lowers_loss_keeps_int8_and_reloads(arch, converted, tmp_path):
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from int8.runtime import get_peft_model, load_adapter

    torch.manual_seed(0)
    # T5 with its original tied head (the tiny untied random head leaves LoRA little room to move the logits)
    _, out = converted(arch, untied_head=arch not in T5_FAMILY)
    before = sha(out)
    tok = AutoTokenizer.from_pretrained(out)
    model = no_dropout(load(out, device="cpu"))
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("codes", "scale_bits"))}
    assert frozen
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS[arch]))
    lora_layers = [m for m in model.modules() if isinstance(m, Int8LoraLinear)]
    assert lora_layers and all(isinstance(m.base_layer, Int8Linear) for m in lora_layers)
    model.gradient_checkpointing_enable()
    model.train()
    opt = adapter_optimizer(model, lr=1e-2)
    assert type(opt).__name__ == "AdamW8bit"  # bitsandbytes' 8-bit AdamW, on CPU too
    batches = text_batches(tok, seq=48, batch=4, n=30)
    held_out = text_batches(tok, seq=48, batch=8, n=1, seed=99)[0]
    with torch.no_grad():
        start = lm_loss(model.eval(), arch, held_out).item()
    model.train()
    for ids in batches:
        lm_loss(model, arch, ids).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        end = lm_loss(model, arch, held_out).item()
    assert end < start - 0.5, f"held-out loss {start:.3f} -> {end:.3f}"
    for n, b in model.base_model.model.named_buffers():
        if n in frozen:
            assert torch.equal(b, frozen[n]), f"{n} changed during training"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    ids = ids_for(arch, seed=3)
    ref = logits(model, arch, ids)
    reloaded = load_adapter(load(out, device="cpu"), tmp_path / "adapter").eval()
    assert any(isinstance(m, Int8LoraLinear) for m in reloaded.modules())
    assert torch.equal(logits(reloaded, arch, ids), ref)
    assert not torch.equal(logits(load(out, device="cpu"), arch, ids), ref)  # the adapter does something
    assert sha(out) == before


@pytest.mark.parametrize("arch", ["gptj", "t5"])
def test_gradient_checkpointing_gives_the_same_gradients(arch, converted):
    from peft import LoraConfig

    from int8.runtime import get_peft_model

    _, out = converted(arch)
    ids = ids_for(arch, n=16, batch=2, seed=4)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = no_dropout(load(out, device="cpu"))
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[arch], init_lora_weights=False)
        model = get_peft_model(model, cfg)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        lm_loss(model, arch, ids).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        assert plain[n].abs().sum() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-5 * plain[n].abs().max().item())


def test_all_linear_targets_int8_layers_but_not_the_head(converted):
    from peft import LoraConfig

    from int8.runtime import get_peft_model

    _, out = converted("gptj")
    model = get_peft_model(load(out, device="cpu"), LoraConfig(r=2, target_modules="all-linear"))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, Int8LoraLinear)}
    assert len(wrapped) == 12  # 2 layers x (q, k, v, out, fc_in, fc_out)
    assert not any("lm_head" in n for n in wrapped)


def test_merging_into_int8_is_refused(converted):
    from peft import LoraConfig

    from int8.runtime import get_peft_model

    _, out = converted("gptj")
    model = get_peft_model(load(out, device="cpu"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="int8"):
        model.merge_and_unload()


# ---------------------------------------------------------------------------------------------
# Generation helpers and the CLI function


def test_stream_generate_streams_what_generate_returns(converted):
    from transformers import AutoTokenizer

    _, out = converted("gptj")
    tok = AutoTokenizer.from_pretrained(out)
    model = load(out, device="cpu")
    pieces: list[str] = []
    new = stream_generate(model, tok, "The keeper climbed", max_new_tokens=12, emit=pieces.append)
    assert len(new) == 12 and len(pieces) >= 2  # several pieces: streamed, not printed at the end
    assert "".join(pieces) == tok.decode(new, skip_special_tokens=True)
    ids = tok("The keeper climbed", return_tensors="pt")["input_ids"]
    assert torch.equal(greedy(model, ids, n=12)[0, ids.shape[1] :], new)


def test_run_generate_prints_prompt_and_continuation(converted, capsys):
    import io

    _, out = converted("t5")
    buf = io.StringIO()
    text = run_generate(str(out), "Translate: hello", max_new_tokens=6, device="cpu", stream=buf)
    assert buf.getvalue() == text + "\n"  # seq2seq: only the generated text
    _, out = converted("bloom")
    buf = io.StringIO()
    text = run_generate(str(out), "Once upon", max_new_tokens=6, device="cpu", stream=buf)
    assert buf.getvalue() == "Once upon" + text + "\n"


def test_generate_command_errors(converted, tmp_path):
    from int8.cli.generate import generate

    with pytest.raises(SourceNotFound):
        generate(str(tmp_path / "nope"), "hi")
    _, out = converted("gptj")
    with pytest.raises(Int8Error, match="max-new-tokens"):
        run_generate(str(out), "hi", max_new_tokens=0, device="cpu")


# ---------------------------------------------------------------------------------------------
# Errors


def test_load_refuses_what_it_cannot_run(converted, tmp_path):
    src, out = converted("gptj")
    with pytest.raises(UnsupportedModel, match="not an int8 checkpoint"):
        load(src, device="cpu")
    with pytest.raises(SourceNotFound):
        load(tmp_path / "missing", device="cpu")

    import shutil

    four_bit = tmp_path / "four-bit"
    shutil.copytree(out, four_bit)
    cfg = json.loads((four_bit / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    (four_bit / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="num_bits is 4"):
        load(four_bit, device="cpu")

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    index = broken / "model.safetensors.index.json"
    if index.exists():
        shard = sorted(broken.glob("model-*.safetensors"))[0]
        shard.unlink()
    else:
        (broken / "model.safetensors").unlink()
    with pytest.raises((CorruptCheckpoint, Int8Error)):
        load(broken, device="cpu")


def test_unknown_device_and_dtype(converted):
    _, out = converted("gptj")
    with pytest.raises(Int8Error, match="dtype"):
        load(out, device="cpu", dtype="int4")
    if not torch.cuda.is_available():
        with pytest.raises(Int8Error, match="CUDA"):
            load(out, device="cuda")


def test_memory_is_int8_sized(converted):
    """Bytes of the quantized layers: 1 per weight + the fp32 scales, a quarter of fp32 (+ 4/BLOCK)."""
    _, out = converted("gptj")
    model = load(out, device="cpu")
    for m in model.modules():
        if isinstance(m, Int8Linear):
            held = sum(b.numel() * b.element_size() for b in m.buffers())
            n = m.in_features * m.out_features
            assert held == n + m.out_features * math.ceil(m.in_features / BLOCK) * 4  # fp32 scales (the default)
            assert held <= 0.27 * n * 4


def test_generate_command_registers_with_typer(converted):
    """The function the CLI registers as `int8 generate`: its typer annotations parse and it streams to stdout."""
    import typer
    from typer.testing import CliRunner

    from int8.cli.generate import generate

    app = typer.Typer()
    app.command("generate")(generate)
    app.command("noop")(lambda: None)  # a second command, so "generate" is a subcommand as in the real CLI
    _, out = converted("gptj")
    res = CliRunner().invoke(app, ["generate", str(out), "The keeper", "--max-new-tokens", "5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("The keeper") and res.output.endswith("\n")


def test_peft_itself_is_left_unchanged(converted):
    """int8 registers its LoRA layer per config (PEFT's extension point), never by patching PEFT."""
    import subprocess
    import sys

    _, out = converted("gptj")
    code = f"""
import peft.tuners.lora.model as m, peft.tuners.tuners_utils as u
before = (m.LoraModel._create_new_module, u._maybe_include_all_linear_layers)
import int8.runtime.loader, int8.runtime.lora
from int8.runtime import load, get_peft_model
from peft import LoraConfig
model = get_peft_model(load({str(out)!r}, device="cpu"), LoraConfig(r=2, target_modules=["q_proj"]))
assert (m.LoraModel._create_new_module, u._maybe_include_all_linear_layers) == before
import peft
try:
    peft.get_peft_model(load({str(out)!r}, device="cpu"), LoraConfig(r=2, target_modules=["q_proj"]))
except ValueError as e:
    print("plain peft refuses:", e)
else:
    raise SystemExit("plain peft.get_peft_model accepted Int8Linear: something patched PEFT")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "plain peft refuses" in r.stdout


def test_adapter_optimizer_is_8_bit_adam_and_trains_as_well_as_adamw(converted):
    """bitsandbytes' AdamW8bit by default (CPU too): 8-bit state, and the loss falls as far as torch's AdamW's."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from int8.runtime import get_peft_model

    _, out = converted("gptj", untied_head=True)
    tok = AutoTokenizer.from_pretrained(out)
    batches = text_batches(tok, seq=48, batch=4, n=20)
    held_out = text_batches(tok, seq=48, batch=8, n=1, seed=99)[0]

    def run(eight_bit: bool) -> tuple[float, float, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = get_peft_model(no_dropout(load(out, device="cpu")),
                               LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS["gptj"]))
        opt = adapter_optimizer(model, lr=1e-2, eight_bit=eight_bit)
        with torch.no_grad():
            start = lm_loss(model.eval(), "gptj", held_out).item()
        model.train()
        for ids in batches:
            lm_loss(model, "gptj", ids).backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            end = lm_loss(model.eval(), "gptj", held_out).item()
        return start, end, opt

    start, end8, opt8 = run(True)
    start32, end32, opt32 = run(False)
    assert type(opt8).__name__ == "AdamW8bit" and isinstance(opt32, torch.optim.AdamW)
    states = [s for s in opt8.state.values() if s]
    assert states and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)
    assert start == pytest.approx(start32)
    assert start - end8 >= 0.9 * (start32 - end32) > 0.3, (start, end8, end32)
