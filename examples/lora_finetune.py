#!/usr/bin/env python3
"""Fine-tune an int8 checkpoint with LoRA on a small text file, on CPU.

    # any checkpoint `int8 convert` wrote (a folder or a Hub repo id):
    int8 convert bloomz-560m --out bloomz-560m-int8
    python examples/lora_finetune.py bloomz-560m-int8

    # no model at hand: a tiny GPT-J-shaped demo model is built and converted first
    python examples/lora_finetune.py

The big weight matrices stay frozen in int8 (de-quantized just in time for each
multiplication); only the small LoRA adapters train, with gradient
checkpointing. The adapter is saved with PEFT's own ``save_pretrained`` and
reloaded with ``int8.runtime.load_adapter`` (PEFT's ``PeftModel.from_pretrained``) on a fresh int8 model, which
reproduces the fine-tuned outputs exactly.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "lighthouse.txt"


def demo_checkpoint(folder: Path) -> Path:
    """A tiny random GPT-J (GPT-J's layout, small sizes) with a byte-level tokenizer, converted to int8."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPTJConfig, GPTJForCausalLM, PreTrainedTokenizerFast

    import int8

    src = folder / "demo-gptj"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPTJConfig(vocab_size=len(vocab), n_embd=256, n_layer=4, n_head=8, rotary_dim=16, n_positions=512,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    config.architectures = ["GPTJForCausalLM"]
    GPTJForCausalLM(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = folder / "demo-gptj-int8"
    int8.convert(src, out, block_size=64, dtype="bf16", device="cpu")
    return out


def batches(tokenizer, text: str, seq: int, batch: int, steps: int, seed: int):
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if len(ids) <= seq + 1:
        raise SystemExit(f"the text has {len(ids)} tokens; it needs more than --seq {seq}")
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g).tolist()
        yield torch.stack([ids[s : s + seq] for s in starts])


def loss_of(model, ids: torch.Tensor, seq2seq: bool) -> torch.Tensor:
    if seq2seq:  # T5 family: continue the second half of each window from the first
        half = ids.shape[1] // 2
        return model(input_ids=ids[:, :half].contiguous(), labels=ids[:, half:].contiguous()).loss
    return model(input_ids=ids, labels=ids).loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="LoRA fine-tuning of an int8 checkpoint on a small text file (CPU).")
    ap.add_argument("model", nargs="?", help="int8 checkpoint folder or Hub repo id (default: build a tiny demo model)")
    ap.add_argument("--text", type=Path, default=TEXT, help="training text (default: the short story shipped here)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq", type=int, default=64, help="tokens per training window")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3; 1e-2 for the demo model)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="where to save the adapter (default: a temp folder)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from peft import LoraConfig
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from int8.runtime import adapter_optimizer, get_peft_model, load, load_adapter

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames gradient checkpointing
    tmp = Path(tempfile.mkdtemp(prefix="int8-lora-example-"))
    started = time.perf_counter()
    path = args.model or demo_checkpoint(tmp)
    lr = args.lr or (1e-2 if args.model is None else 2e-3)

    # 1. The int8 model: big linears stay int8 in memory.
    model = load(path, device=args.device)
    from int8.runtime.loader import resolve_folder

    tokenizer = AutoTokenizer.from_pretrained(resolve_folder(path))
    seq2seq = bool(model.config.is_encoder_decoder)
    text = args.text.read_text()
    held_out = next(batches(tokenizer, text, args.seq, 8, 1, seed=1234))

    # 2. LoRA adapters on the int8 layers (PEFT picks the usual attention projections for the
    #    model type), gradient checkpointing, bitsandbytes' 8-bit AdamW (its state in 8 bits, on CPU too).
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0))
    model.print_trainable_parameters()
    model.gradient_checkpointing_enable()
    optimizer = adapter_optimizer(model, lr=lr)
    print(f"optimizer: {type(optimizer).__name__}")
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith("codes")}

    with torch.no_grad():
        before = loss_of(model.eval(), held_out.to(args.device), seq2seq).item()
    print(f"held-out loss before: {before:.3f}")
    model.train()
    for step, ids in enumerate(batches(tokenizer, text, args.seq, args.batch, args.steps, seed=0), 1):
        loss = loss_of(model, ids.to(args.device), seq2seq)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - started:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        after = loss_of(model, held_out.to(args.device), seq2seq).item()
    print(f"held-out loss after:  {after:.3f}")
    unchanged = all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)
    print(f"int8 codes unchanged: {unchanged}")

    # 3. Save the adapter with PEFT, reload it on a fresh int8 model, check the outputs agree.
    out = args.out or tmp / "adapter"
    model.save_pretrained(out)
    reloaded = load_adapter(load(path, device=args.device), out).eval()
    probe = held_out[:2].to(args.device)
    with torch.no_grad():
        kw = {"decoder_input_ids": probe[:, :8]} if seq2seq else {}
        same = torch.equal(model(input_ids=probe, **kw).logits, reloaded(input_ids=probe, **kw).logits)
    print(f"adapter saved to {out}; reloaded outputs identical: {same}")

    prompt = "The keeper"
    enc = tokenizer(prompt, return_tensors="pt").to(args.device)
    with torch.no_grad():
        gen = reloaded.generate(**enc, max_new_tokens=40, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = gen[0] if seq2seq else gen[0, enc["input_ids"].shape[1] :]
    print(f"sample: {prompt}{tokenizer.decode(new, skip_special_tokens=True)!r}")
    print(f"done in {time.perf_counter() - started:.0f}s")
    return 0 if (after < before and unchanged and same) else 1


if __name__ == "__main__":
    sys.exit(main())
