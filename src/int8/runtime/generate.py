"""Quick generation from an int8 checkpoint, streaming tokens as they come (the library side of `int8 generate`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, TextIO

from .. import options
from ..errors import Int8Error, first_line


def load_tokenizer(folder: Path):
    """The checkpoint's tokenizer (convert copies it beside the weights)."""
    from ..hf import load_tokenizer as hf_tokenizer

    try:
        return hf_tokenizer(folder)
    except (OSError, ValueError, TypeError) as e:
        raise Int8Error(
            f"{folder} has no tokenizer that transformers can load ({first_line(e)})",
            "Copy the original model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into the folder.",
        ) from None


class CallbackStreamer:
    """A transformers streamer that hands decoded text to ``emit`` as soon as it is final.

    Text is decoded from all new tokens so far and only the new suffix is
    emitted; a suffix ending in an incomplete UTF-8 sequence waits for the next
    token, as transformers' ``TextStreamer`` does.
    """

    def __init__(self, tokenizer, emit: Callable[[str], None], skip_prompt: bool = True):
        self.tokenizer = tokenizer
        self.emit = emit
        self.skip_prompt = skip_prompt
        self._prompt_seen = not skip_prompt
        self._tokens: list[int] = []
        self._printed = 0

    def put(self, value) -> None:
        if value.ndim > 1:
            if value.shape[0] > 1:
                raise ValueError("streaming supports batch size 1")
            value = value[0]
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._tokens.extend(int(t) for t in value.tolist())
        text = self.tokenizer.decode(self._tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self._printed:
            self.emit(text[self._printed :])
            self._printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self._tokens, skip_special_tokens=True)
        if len(text) > self._printed:
            self.emit(text[self._printed :])
            self._printed = len(text)


def stream_generate(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    emit: Callable[[str], None] | None = None,
):
    """Generate a continuation of ``prompt``, calling ``emit(text)`` as tokens arrive; return the new token ids.

    ``temperature=0`` is greedy decoding. For encoder-decoder models (T5) the
    prompt is the encoder input and everything generated is new text.
    """
    import torch

    if max_new_tokens < 1:
        raise Int8Error(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise Int8Error(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    enc = tokenizer(prompt, return_tensors="pt")
    input_ids = enc["input_ids"].to(device)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if input_ids.shape[1] == 0 and not seq2seq:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise Int8Error("the prompt is empty and the tokenizer has no BOS token to start from", "Give a prompt.")
        input_ids = torch.tensor([[bos]], device=device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
        if seed is not None:
            torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    streamer = CallbackStreamer(tokenizer, emit, skip_prompt=not seq2seq) if emit is not None else None
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs
        )
    return out[0] if seq2seq else out[0, input_ids.shape[1] :]


def run_generate(
    model: str,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    stream: TextIO | None = None,
) -> str:
    """Load ``model`` with `int8.load` and continue ``prompt``, writing to ``stream`` (default: stdout) as tokens
    come, the prompt first for a decoder-only model; return the generated text. `int8 generate` is this."""
    from transformers.utils import logging as hf_logging

    from .loader import load, resolve_folder

    options.max_new_tokens(max_new_tokens)
    options.temperature(temperature)
    options.top_p(top_p)
    options.local_revision(model, revision)
    hf_logging.disable_progress_bar()  # the CLI streams text; no "Loading weights" bar in between
    stream = stream if stream is not None else sys.stdout
    pieces: list[str] = []
    folder = resolve_folder(model, revision=revision)
    tokenizer = load_tokenizer(folder)
    lm = load(folder, device=device, dtype=dtype)
    seq2seq = bool(getattr(lm.config, "is_encoder_decoder", False))
    if not seq2seq:
        stream.write(prompt)
        stream.flush()

    def emit(text: str) -> None:
        pieces.append(text)
        stream.write(text)
        stream.flush()

    stream_generate(
        lm, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, emit=emit
    )
    stream.write("\n")
    stream.flush()
    return "".join(pieces)
