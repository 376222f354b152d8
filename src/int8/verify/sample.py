"""The text that fidelity is measured on, and how it is cut into model inputs.

The built-in sample is a few paragraphs of plain, varied English prose written
for int8 (no licence questions): narrative, explanation, numbers, a list and a
little dialogue, so that a model's next-token predictions are exercised on
more than one register. ``--text FILE`` replaces it (UTF-8 text; more text
means steadier figures).

The sample is tokenized as the model is used. A causal model gets its
tokenizer's own special tokens (``add_special_tokens=True``) and every window
starts with the tokenizer's BOS token, as a document does when it is generated
from or scored by an evaluation harness: many tokenizers (GPT-2's, BLOOM's,
SmolLM2's) do not add one themselves, and a model that never sees it scores
its first positions as degenerately as if the text started mid-sentence
(SmolLM2 without BOS: a perplexity several times higher, and KL figures that
say more about that than about the weights). A model without a BOS token
(``bos_token_id`` None) reads the bare text. Encoder-decoder models (T5, mT5)
keep the bare text (no EOS after it): each window is split in two, the first
half the encoder input, the second half the decoder target, fed teacher-forced
behind the decoder start token; they are scored on the target tokens.

Causal windows hold at most ``window`` positions, BOS included, and are scored
on every next-token prediction inside them (teacher forcing): with a BOS, on
every text token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_TEXT = """\
The lighthouse on the northern cape was built in 1874, after two cargo ships ran aground on the same reef within a \
single winter. Its first keeper, a former sailmaker named Elias Brandt, kept a logbook in which he recorded the wind, \
the state of the sea and every vessel that passed. On calm nights he wrote long entries about the stars; during storms \
his handwriting shrank to a few shaky words: "Lamp lit. Glass holding. No ships."

Keeping the light was tedious work. Every evening the lens had to be polished, the wick trimmed and the clockwork that \
turned the lamp wound by hand. A full turn took thirty seconds, which gave the lighthouse its signature: two short \
flashes, then darkness for twenty-six seconds. Captains learned to count the gaps, because each lighthouse along the \
coast had a different rhythm, and a wrong count could mean steering toward the rocks instead of away from them.

Today the lamp is electric and the keeper's cottage is a small museum. Visitors can climb the 112 steps of the spiral \
staircase, read a copy of the logbook and look at the old lens, a beehive of glass prisms almost three metres tall. \
The museum's guide explains how it works in three steps:

1. A single flame sits at the centre of the lens.
2. Curved prisms bend the light above and below the flame into a flat, narrow beam.
3. The beam rotates, so a ship far away sees a brief, bright flash rather than a dim, steady glow.

"Why not simply use a bigger fire?" a child asked during one tour. The guide smiled and held up a magnifying glass. \
"Because a clever piece of glass can do what a thousand candles cannot," she said. "It does not make more light. It \
sends the light you have to the place where it is needed."

Engineers still use the same idea. A car headlamp, a projector and the optical fibre that carries a telephone call \
under the ocean all depend on guiding light rather than producing more of it. The principle is older than the \
lighthouse, older than the ships it protected, and it will probably outlast the electric lamp that turns on the cape \
every evening at dusk.
"""
"""The default sample (about 480 GPT-2 tokens)."""

MAX_TOKENS = 2048
"""At most this many tokens of the sample are scored (the rest of a long --text is ignored)."""


@dataclass(frozen=True)
class Window:
    """One teacher-forced forward pass: model inputs and the token each scored position must predict."""

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor  # (n,) token ids the scored logits predict
    scored: slice  # which logit positions (along the sequence) are scored

    @property
    def tokens(self) -> int:
        return int(self.targets.numel())


@dataclass(frozen=True)
class Tokens:
    """The sample as the model reads it."""

    ids: list[int]  # the text's tokens, with the special tokens its tokenizer adds (a leading BOS apart)
    bos: int | None = None  # the token every causal window starts with (None: none)


def tokenize(tokenizer, text: str, max_tokens: int = MAX_TOKENS, *, seq2seq: bool = False) -> Tokens:
    """``text`` tokenized as the model is used (see the module docstring); at most ``max_tokens`` ids are kept."""
    if seq2seq:
        return Tokens(list(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]))
    ids = list(tokenizer(text)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    bos = bos if isinstance(bos, int) else None
    if bos is not None and ids[:1] == [bos]:  # the tokenizer adds it itself: one per window, not two
        ids = ids[1:]
    return Tokens(ids[:max_tokens], bos)


def windows(tokens: Tokens, *, seq2seq: bool, window: int, decoder_start: int | None = None) -> list[Window]:
    """Cut the sample into teacher-forced windows (see the module docstring)."""
    import torch

    if window < 4:
        raise ValueError(f"window of {window} tokens is too short")
    prefix = [] if seq2seq or tokens.bos is None else [tokens.bos]
    step = window - len(prefix)
    ids = tokens.ids
    out = []
    for start in range(0, len(ids), step):
        chunk = prefix + ids[start : start + step]
        if len(chunk) < 4:
            break
        t = torch.tensor([chunk], dtype=torch.long)
        if seq2seq:
            half = len(chunk) // 2
            src, tgt = t[:, :half], t[:, half:]
            start_id = 0 if decoder_start is None else int(decoder_start)
            dec = torch.cat([torch.full_like(tgt[:, :1], start_id), tgt[:, :-1]], dim=1)
            inputs = {
                "input_ids": src,
                "attention_mask": torch.ones_like(src),
                "decoder_input_ids": dec,
            }
            out.append(Window(inputs, tgt[0], slice(0, tgt.shape[1])))
        else:
            inputs = {"input_ids": t, "attention_mask": torch.ones_like(t)}
            out.append(Window(inputs, t[0, 1:], slice(0, t.shape[1] - 1)))
    return out
