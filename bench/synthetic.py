"""Synthetic GPT-J-shaped FP32 checkpoints for the benchmarks.

Every tensor has GPT-J-6B's shape (n_embd 4096, 16384-wide MLP), but the
vocabulary is 8192 instead of 50400 so that one layer makes about 1 GB and
four layers about 3.3 GB: sizes differ by layer count only, so the marginal
rate between two sizes is the converter's steady-state rate. Written with
int8's streaming safetensors writer, a tensor at a time, in flat memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from int8.conversion.writer import ShardWriter  # noqa: E402
from int8.formats.safetensors import OutputTensor  # noqa: E402

N_EMBD = 4096
N_INNER = 16384
VOCAB = 8192


def gptj_tensors(n_layer: int, vocab: int = VOCAB) -> list[OutputTensor]:
    t = [OutputTensor("transformer.wte.weight", "F32", (vocab, N_EMBD))]
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        t += [
            OutputTensor(f"{p}.ln_1.weight", "F32", (N_EMBD,)),
            OutputTensor(f"{p}.ln_1.bias", "F32", (N_EMBD,)),
            OutputTensor(f"{p}.attn.q_proj.weight", "F32", (N_EMBD, N_EMBD)),
            OutputTensor(f"{p}.attn.k_proj.weight", "F32", (N_EMBD, N_EMBD)),
            OutputTensor(f"{p}.attn.v_proj.weight", "F32", (N_EMBD, N_EMBD)),
            OutputTensor(f"{p}.attn.out_proj.weight", "F32", (N_EMBD, N_EMBD)),
            OutputTensor(f"{p}.mlp.fc_in.weight", "F32", (N_INNER, N_EMBD)),
            OutputTensor(f"{p}.mlp.fc_in.bias", "F32", (N_INNER,)),
            OutputTensor(f"{p}.mlp.fc_out.weight", "F32", (N_EMBD, N_INNER)),
            OutputTensor(f"{p}.mlp.fc_out.bias", "F32", (N_EMBD,)),
        ]
    t += [
        OutputTensor("transformer.ln_f.weight", "F32", (N_EMBD,)),
        OutputTensor("transformer.ln_f.bias", "F32", (N_EMBD,)),
        OutputTensor("lm_head.weight", "F32", (vocab, N_EMBD)),
        OutputTensor("lm_head.bias", "F32", (vocab,)),
    ]
    return t


def gptj_config(n_layer: int, vocab: int = VOCAB) -> dict:
    from transformers import GPTJConfig

    cfg = GPTJConfig(
        vocab_size=vocab, n_embd=N_EMBD, n_layer=n_layer, n_head=16, rotary_dim=64, n_positions=2048,
        bos_token_id=0, eos_token_id=0,
    )
    cfg.architectures = ["GPTJForCausalLM"]
    return cfg.to_dict()


def build(folder: Path, n_layer: int, seed: int = 0, vocab: int = VOCAB) -> Path:
    """Write config.json + model.safetensors (unless already there with the same layer count and vocabulary).

    ``vocab=50400, n_layer=28`` is GPT-J-6B's size (24 GB of FP32), written a tensor chunk at a time."""
    folder = Path(folder)
    marker = folder / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()).get("n_layer") == n_layer and \
            json.loads(marker.read_text()).get("vocab", VOCAB) == vocab:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        p.unlink()
    tensors = gptj_tensors(n_layer, vocab)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    for t in tensors:
        rows = t.shape[0]
        step = max(1, (64 << 20) // (t.nbytes // rows))
        for r0 in range(0, rows, step):
            chunk = torch.randn((min(step, rows - r0), *t.shape[1:]), generator=gen) * 0.02
            if "ln_" in t.name and t.name.endswith("weight"):
                chunk += 1
            writer.write(chunk.numpy())
    writer.close()
    (folder / "config.json").write_text(json.dumps(gptj_config(n_layer, vocab), indent=2))
    marker.write_text(json.dumps({"n_layer": n_layer, "vocab": vocab, "bytes": sum(t.nbytes for t in tensors)}))
    return folder


def nbytes(n_layer: int, vocab: int = VOCAB) -> int:
    return sum(t.nbytes for t in gptj_tensors(n_layer, vocab))


def largest_tensor(n_layer: int) -> int:
    return max(t.nbytes for t in gptj_tensors(n_layer))


# --------------------------------------------------------------------------- any architecture of int8's table

T5_SMALL = {  # t5-small's config.json (the structural fields)
    "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 32128, "d_model": 512,
    "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8, "feed_forward_proj": "relu", "is_encoder_decoder": True,
    "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
}
BLOOM_560M = {  # bigscience/bloom-560m's config.json (the structural fields)
    "model_type": "bloom", "architectures": ["BloomForCausalLM"], "vocab_size": 250880, "hidden_size": 1024,
    "n_layer": 24, "n_head": 16, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
}


def build_from_config(folder: Path, config: dict, seed: int = 0) -> Path:
    """Write config.json + model.safetensors holding every tensor `int8.architectures` lists for ``config``
    (tied copies left out, as save_pretrained does), random N(0, 0.02), norms around 1."""
    from int8.architectures import from_table

    folder = Path(folder)
    marker = folder / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()).get("config") == config:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        p.unlink()
    facts = from_table(config)
    tensors = [OutputTensor(k, "F32", s) for k, s in facts.params.items() if k not in facts.tied]
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    for t in tensors:
        rows = t.shape[0]
        step = max(1, (64 << 20) // max(1, t.nbytes // rows))
        for r0 in range(0, rows, step):
            chunk = torch.randn((min(step, rows - r0), *t.shape[1:]), generator=gen) * 0.02
            if len(t.shape) == 1 and "norm" in t.name and t.name.endswith("weight"):
                chunk += 1
            writer.write(chunk.numpy())
    writer.close()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    marker.write_text(json.dumps({"config": config, "bytes": sum(t.nbytes for t in tensors), "tensors": len(tensors)}))
    return folder


def nbytes_of(folder: Path) -> int:
    return json.loads((Path(folder) / "synthetic.json").read_text())["bytes"]
