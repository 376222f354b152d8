"""The ``tokenizer`` check: the tokenizer files of the manifest are there, and AutoTokenizer loads them."""

from __future__ import annotations

from ...errors import first_line
from ..layout import Layout
from ..result import Check, outcome

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
)


def check_tokenizer(layout: Layout) -> Check:
    threshold = "AutoTokenizer loads it; ids within the vocabulary"
    folder, report = layout.folder, layout.report
    listed = [e.name for e in report.files] if report else []
    missing = [n for n in listed if (n in TOKENIZER_FILES or n.startswith("tokenizer")) and not (folder / n).is_file()]
    problems = [f"{n} (a tokenizer file in the manifest) is missing" for n in missing]
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        problems.append(f"{folder.name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    from ...hf import load_tokenizer

    try:
        tok = load_tokenizer(folder)
    except Exception as e:  # any failure to load is the finding
        present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
        msg = first_line(e)
        problems.append(
            f"the tokenizer does not load from {folder.name} ({msg[:200]}); tokenizer files present: "
            + (", ".join(present) or "none")
        )
        return outcome("tokenizer", problems, figure="does not load", threshold=threshold)
    from ..sample import DEFAULT_TEXT

    ids = tok(DEFAULT_TEXT[:400], add_special_tokens=False)["input_ids"]
    vocab = (layout.config or {}).get("vocab_size")
    if not ids:
        problems.append("the tokenizer turns the sample text into no tokens")
    elif isinstance(vocab, int) and max(ids) >= vocab:
        problems.append(f"the tokenizer yields token id {max(ids)}, beyond config.json's vocab_size {vocab}")
    figure = f"{type(tok).__name__}, {len(tok)} tokens"
    return outcome("tokenizer", problems, figure=figure, threshold=threshold)
