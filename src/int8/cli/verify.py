"""`int8 verify`: a thin layer over `int8.verify.verify_checkpoint` and its renderers."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options
from ..errors import Int8Error, UsageError
from .display import StageProgress, console, out, say
from .option_types import device_option, json_option, quiet_option, revision_option

Device = device_option("Where models run: auto (GPU if any), cpu, cuda, cuda:N.")
Revision = revision_option("Hub branch, tag or commit of TARGET (not for a local folder).")
JsonFile = json_option("Also write the result to FILE as JSON (schema int8.verify/1), whole or not at all.")
Quiet = quiet_option("No progress or table: failures and the verdict only.")


def budget_size(flag: str, value: str | None) -> str | None:
    """--max-memory / --max-gpu-memory: checked while parsing (a size, and within the machine's memory)."""
    if value is None:
        return None
    from ..verify.budget import check_budget, parse_budget

    size = parse_budget(value, flag)
    if flag == "--max-memory":
        check_budget(size)
    return value


def verify(
    target: Annotated[str, typer.Argument(help="A folder written by `int8 convert`, or a Hub repo id (owner/name).")],
    against: Annotated[
        Optional[str],
        typer.Option(
            "--against",
            help="The original to compare with: a preset, a Hub repo id or a folder. Default: the source recorded "
            "in int8_report.json (or the card's base_model), when it can be reached.",
            metavar="SOURCE",
            show_default=False,
        ),
    ] = None,
    text: Annotated[
        Optional[Path],
        typer.Option("--text", help="UTF-8 text to measure fidelity on. Default: a built-in sample.", metavar="FILE",
                     show_default=False),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Structure and integrity only (no model is built): seconds, even for 6B.")
    ] = False,
    json_file: JsonFile = None,
    device: Device = "auto",
    revision: Revision = None,
    update_card: Annotated[
        bool, typer.Option("--update-card", help="Record the result in the folder's model card (README.md).")
    ] = False,
    max_kl: Annotated[
        Optional[float], typer.Option("--max-kl", help="Ceiling on mean KL divergence, nats/token [default: 0.05].",
                                      show_default=False, callback=options.callback(options.finite, "--max-kl", low=0.0))
    ] = None,
    kl_factor: Annotated[
        Optional[float], typer.Option("--kl-factor", help="Mean KL may be this many times that of ideal int8 "
                                      "rounding noise [default: 3].", show_default=False,
                                      callback=options.callback(options.finite, "--kl-factor", low=0.0, low_open=True))
    ] = None,
    min_top1: Annotated[
        Optional[float], typer.Option("--min-top1", help="Least top-1 next-token agreement, 0 to 1 "
                                      "[default: 0.9, or the noise reference's less 0.05].", show_default=False,
                                      callback=options.callback(options.finite, "--min-top1", low=0.0, high=1.0))
    ] = None,
    max_ppl_ratio: Annotated[
        Optional[float], typer.Option("--max-ppl-ratio", help="Perplexity within this ratio of the "
                                      "original's, either way [default: 1.05].", show_default=False,
                                      callback=options.callback(options.finite, "--max-ppl-ratio", low=1.0))
    ] = None,
    max_tokens: Annotated[int, typer.Option("--tokens", "--max-tokens", min=8,
                                            help="Tokens of the text to score, at most (fewer: faster on big models).")] = 2048,
    max_memory: Annotated[
        Optional[str], typer.Option("--max-memory", metavar="SIZE", show_default=False,
                                    help="Memory the checks may use, e.g. 8GB or 1.5GB [default: what is available]. "
                                    "A model that does not fit whole is run layer by layer, with the same figures.",
                                    callback=options.callback(budget_size, "--max-memory"))
    ] = None,
    max_gpu_memory: Annotated[
        Optional[str], typer.Option("--max-gpu-memory", metavar="SIZE", show_default=False,
                                    help="GPU memory the checks may use on CUDA [default: what is free].",
                                    callback=options.callback(budget_size, "--max-gpu-memory"))
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Check that a converted checkpoint is whole and faithful: exit 0 when every check passes, 1 when one fails.

    Structure and integrity (every file against the SHA-256 manifest, the index, each quantized
    layer's tensors, codes in [-127, 127], finite scales, tokenizer, card); then stock transformers
    loads it and runs it; then it is compared with the original: each tensor's reconstruction
    error, and top-1 agreement, KL divergence and perplexity on a text sample.
    A local folder gets the result in int8_verify.json.

    A checkpoint another tool wrote in the same format (llm-compressor's W8A16: no int8_report.json,
    no int8 card) skips the checks of int8's own files and allows the code -128; name its original
    with --against. Other schemes (4-bit, W8A8, FP8, ...) are reported as not checked (exit 1).

    Examples:

    `int8 verify gpt-j-6b-int8`

    `int8 verify gpt-j-6b-int8 --quick --json verify.json`

    `int8 verify you/flan-t5-small-int8 --against flan-t5-small --update-card`

    `int8 verify ./llama-w8a16 --against meta-llama/Llama-3.2-1B`
    """
    from ..verify import Thresholds, verify_checkpoint
    from ..verify.render import print_result
    from ..verify.render import update_card as rewrite_card

    options.local_revision(target, revision)
    if update_card and not Path(target).expanduser().is_dir():
        raise UsageError(f"--update-card rewrites the card of a local folder, and {target} is not one")
    thresholds = Thresholds().overridden(kl_max=max_kl, kl_factor=kl_factor, top1_min=min_top1, ppl_ratio_max=max_ppl_ratio)
    result = verify_checkpoint(
        target,
        against=against,
        text=text,
        quick=quick,
        device=device,
        revision=revision,
        thresholds=thresholds,
        max_tokens=max_tokens,
        save=True if update_card else None,
        progress=None if quiet else say,
        max_memory=max_memory,
        max_gpu_memory=max_gpu_memory,
        bar=None if quiet else lambda _what: StageProgress("layer by layer: original, 3 reference draws, converted"),
    )
    if json_file is not None:
        try:
            options.write_text_atomically(json_file, result.to_json())
        except OSError as e:
            raise Int8Error(f"cannot write --json {json_file}: {e.strerror or e}", "Nothing was written there.") from None
    if update_card:
        rewrite_card(result)
    print_result(out, console, result, quiet=quiet)
    sys.exit(0 if result.passed else 1)
