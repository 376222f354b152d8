"""The `int8` command line: a thin layer over the library (`int8.convert`, `int8.verify`, ...).

Every user mistake ends with a one-paragraph message, a hint, and exit code 2;
a traceback means a bug in int8.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape as _escape
from rich.table import Table

from . import __version__, options
from .errors import Int8Error

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def _preset_epilog() -> str:
    from .presets import all_presets

    try:
        names = ", ".join(all_presets())
    except Int8Error:
        names = "(the preset files could not be read)"
    return f"Presets: {names}. `int8 presets` describes them."


app = typer.Typer(
    name="int8",
    help=(
        "Turn big FP32 language-model checkpoints into 8-bit ones that run and fine-tune on one GPU, "
        "check them, and publish them.\n\n"
        "Typical use:\n\n"
        "`int8 convert flan-t5-small --out flan-t5-small-int8`\n\n"
        "`int8 verify flan-t5-small-int8`\n\n"
        "`int8 push flan-t5-small-int8 --repo you/flan-t5-small-int8`"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        out.print(f"int8 {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


class RichProgress:
    """Bytes and tensors done, rate and time left, drawn with rich."""

    def __init__(self, description: str):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[tensors]} tensors"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._description = description
        self._task = None
        self._tensors = 0
        self._total_tensors = 0

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self._total_tensors = total_tensors
        self._progress.start()
        self._task = self._progress.add_task(self._description, total=total_bytes, tensors=f"0/{total_tensors}")

    def advance(self, nbytes: int, tensors: int = 0) -> None:
        self._tensors += tensors
        self._progress.update(self._task, advance=nbytes, tensors=f"{self._tensors}/{self._total_tensors}")

    def finish(self) -> None:
        self._progress.stop()


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _checked_size(value: str) -> str:
    options.shard_size(value)
    return value


@app.command(epilog=_preset_epilog())
def convert(
    source: Annotated[str, typer.Argument(help="A preset name (`int8 presets`), a Hub repo id (owner/name), or a local folder.")],
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Output folder. Default: `./NAME-int8`.", show_default=False,
                     callback=lambda v: None if v is None else options.output_folder(v)),
    ] = None,
    block_size: Annotated[
        Optional[int],
        typer.Option(
            "--block-size",
            min=1,
            help="Values per absmax scale, along each row (input dimension). Default: the preset's, else 128. "
            "vLLM's int8 kernels take 32, 64 or 128.",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(
            "--dtype",
            help="dtype of the scales and of everything not quantized: fp16, bf16 or fp32. "
            "Default: the preset's (bf16 for T5-family models, which overflow in fp16), else bf16.",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="Where to quantize: auto (GPU if any), cpu, cuda, cuda:N.")] = "auto",
    skip: Annotated[
        Optional[list[str]],
        typer.Option(
            "--skip",
            help="Keep modules matching PATTERN unquantized (repeatable): a module name or one of its dotted parts "
            "(`lm_head`, `mlp.fc_in`), a glob (`*.attn.*`), or `re:REGEX`. lm_head and the model class's fp32 modules "
            "are always kept. A pattern that matches nothing is warned about.",
            metavar="PATTERN",
            callback=options.skip_patterns,
        ),
    ] = None,
    revision: Annotated[
        Optional[str], typer.Option("--revision", help="Hub branch, tag or commit of the source (not for a local folder).")
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB or 500MB.", callback=_checked_size)
    ] = "5GB",
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace --out if it holds an earlier int8 output and nothing else "
                     "(a folder with other files in it is never replaced)."),
    ] = False,
    push: Annotated[
        Optional[str],
        typer.Option("--push", help="After converting, publish to this Hub repo (as `int8 push` does).", metavar="REPO_ID"),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary; errors only.")] = False,
) -> None:
    """Convert a checkpoint to int8: linear weights in int8 blocks with absmax scales, the rest in --dtype.

    The output is a compressed-tensors `pack-quantized` folder that plain transformers loads
    (with `pip install compressed-tensors`) and vLLM serves, plus a model card and a
    conversion report (`int8_report.json`). Memory stays flat: a 24 GB model converts in a few GB of RAM.

    Examples:

    `int8 convert gpt-j-6b`

    `int8 convert bigscience/bloomz-560m --out bloomz-int8 --dtype fp16`

    `int8 convert ./my-model --block-size 64 --skip "re:.*\\.attn\\..*"`

    `int8 convert ./my-model --skip lm_head --skip "*.mlp.fc_out"`
    """
    from .conversion.api import convert as run_convert
    from .conversion.api import default_output

    options.local_revision(source, revision)
    folder = out_dir if out_dir is not None else default_output(source)
    if push:
        from .hub.upload import check_can_push

        check_can_push(push)  # a missing token or a malformed repo id fails now, not after the conversion
    progress = None if quiet else RichProgress("Converting")
    warned: list[str] = []

    def warn(message: str) -> None:  # as soon as it is known: before the long work
        warned.append(message)
        console.print(f"[yellow]Warning:[/] {message}", markup=True, highlight=False)

    report = run_convert(
        source,
        folder,
        block_size=block_size,
        dtype=dtype,
        device=device,
        skip=skip or (),
        revision=revision,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
        quiet=quiet,
        on_warning=warn,
    )
    for w in report.warnings:
        if w not in warned:
            warn(w)
    if not quiet:
        t = report.totals
        table = Table(title="int8 convert", show_header=False, title_justify="left")
        table.add_column()
        table.add_column(overflow="fold")  # a long output path wraps whole, never cut with an ellipsis
        table.add_row("source", report.source.id + (f" @ {report.source.commit[:12]}" if report.source.commit else ""))
        table.add_row("model", f"{report.model.architecture} ({report.model.model_type})")
        table.add_row("size in", _size(t.bytes_in))
        table.add_row("size out", _size(t.bytes_out))
        table.add_row("ratio", f"{t.ratio:.2f}x")
        table.add_row("tensors", f"{t.tensors_quantized} quantized, {t.tensors_kept} kept, {t.tensors_dropped} dropped")
        table.add_row("time", f"{t.seconds:.1f} s on {t.device} ({t.stream_seconds:.1f} s streaming tensors)")
        table.add_row("throughput", f"{t.throughput_gb_s:.2f} GB/s of input while streaming")
        table.add_row("output", str(folder))
        console.print(table)
    if push:
        _push(folder, push, quiet=quiet)


def _push(folder: Path, repo: str, quiet: bool = False, **kwargs) -> None:
    from .hub.upload import push as run_push

    say = None if quiet else (lambda msg: console.print(f"[dim]{msg}...[/]"))
    result = run_push(folder, repo, quiet=quiet, progress=say, **kwargs)
    lines = [result.commit_url] + ([result.pr_url] if result.pr_url else [])
    if not quiet:
        lines = [
            f"Published to {result.repo_url}" + (f" (branch {result.revision})" if result.revision else ""),
            f"commit: {result.commit_url}",
        ] + ([f"pull request: {result.pr_url}"] if result.pr_url else [])
    for line in lines:  # URLs whole on one line each, for people and for scripts
        out.print(line, soft_wrap=True, markup=False)


@app.command()
def push(
    path: Annotated[Path, typer.Argument(help="A folder written by `int8 convert`.", show_default=False)],
    repo: Annotated[
        str,
        typer.Option("--repo", help="The model repo to publish to: OWNER/NAME, or NAME for your own namespace.",
                     metavar="ID", show_default=False),
    ],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")] = False,
    revision: Annotated[
        Optional[str],
        typer.Option("--revision", help="Branch to commit to (created from main when missing); with --create-pr, "
                     "the branch the pull request targets.", metavar="BRANCH", show_default=False),
    ] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request on an existing repo instead of committing.")] = False,
    message: Annotated[
        Optional[str], typer.Option("--message", "-m", help="Commit message.", metavar="TEXT", show_default=False)
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress; print only the commit (and PR) URL.")] = False,
) -> None:
    """Publish a converted folder to the Hugging Face Hub, after `int8 verify --quick` passes.

    The model card is rendered again for the repo (its snippets load OWNER/NAME; the figures of the
    latest full `int8 verify` are included), the repo is created if needed, and the folder is uploaded
    (weights through LFS). Re-running after an interruption sends only what the Hub lacks. The token
    comes from HF_TOKEN or `hf auth login`; it is never printed or written anywhere.

    Examples:

    `int8 push flan-t5-small-int8 --repo you/flan-t5-small-int8`

    `int8 push gpt-j-6b-int8 --repo your-org/gpt-j-6b-int8 --private`

    `int8 push gpt-j-6b-int8 --repo org/gpt-j-6b-int8 --create-pr -m "New card"`
    """
    _push(path, repo, quiet=quiet, private=private, revision=revision, create_pr=create_pr, message=message)


@app.command()
def card(
    path: Annotated[Path, typer.Argument(help="A folder written by `int8 convert`.", show_default=False)],
    repo: Annotated[
        Optional[str],
        typer.Option("--repo", help="Repo id the usage snippets load. Default: the one the card already names "
                     "(after a push), else NAME-int8.", metavar="ID", show_default=False),
    ] = None,
) -> None:
    """Write the folder's model card (README.md) again from int8_report.json and the latest int8_verify.json.

    Metadata (base_model, license, languages, datasets, pipeline tag) is kept from the current card,
    else taken from the original's card or the preset.
    """
    from .hub.card import rewrite_card

    written = rewrite_card(path, repo_id=repo)
    out.print(f"Wrote {written}")


@app.command()
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
    json_file: Annotated[
        Optional[Path],
        typer.Option("--json", help="Also write the result to FILE as JSON (schema int8.verify/1), whole or not at all.",
                     metavar="FILE", show_default=False, callback=options.json_output),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="Where models run: auto (GPU if any), cpu, cuda, cuda:N.")] = "auto",
    revision: Annotated[
        Optional[str], typer.Option("--revision", help="Hub branch, tag or commit of TARGET (not for a local folder).")
    ] = None,
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
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=8, help="Tokens of the text to score, at most.")] = 2048,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or table: failures and the verdict only.")] = False,
) -> None:
    """Check that a converted checkpoint is whole and faithful: exit 0 when every check passes, 1 when one fails.

    Structure and integrity (every file against the SHA-256 manifest, the index, each quantized
    layer's tensors, codes in [-127, 127], finite scales, tokenizer, card); then stock transformers
    loads it and runs it; then it is compared with the original: each tensor's reconstruction
    error, and top-1 agreement, KL divergence and perplexity on a text sample.
    A local folder gets the result in int8_verify.json.

    Examples:

    `int8 verify gpt-j-6b-int8`

    `int8 verify gpt-j-6b-int8 --quick --json verify.json`

    `int8 verify you/flan-t5-small-int8 --against flan-t5-small --update-card`
    """
    from dataclasses import replace

    from .verify import Thresholds, verify_checkpoint
    from .verify.render import print_result
    from .verify.render import update_card as rewrite_card

    options.local_revision(target, revision)
    if update_card and not Path(target).expanduser().is_dir():
        raise Int8Error(f"--update-card rewrites the card of a local folder, and {target} is not one")
    overrides = {"kl_max": max_kl, "kl_factor": kl_factor, "top1_min": min_top1, "ppl_ratio_max": max_ppl_ratio}
    thresholds = replace(Thresholds(), **{k: v for k, v in overrides.items() if v is not None})
    if min_top1 is not None:
        thresholds = replace(thresholds, top1_slack=0.0)
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
        progress=None if quiet else (lambda msg: console.print(f"[dim]{msg}...[/]")),
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


from .runtime.generate import generate_command  # noqa: E402  (imports neither torch nor transformers)

app.command("generate")(generate_command)


@app.command()
def presets() -> None:
    """List the model presets that `int8 convert NAME` accepts."""
    from .presets import all_presets

    table = Table(title="int8 presets")
    table.add_column("preset", no_wrap=True)
    table.add_column("Hub repo", overflow="fold", min_width=29)  # a repo id is copied from here: wrap it, never cut it
    for col in ("params", "dtype"):
        table.add_column(col, no_wrap=True)
    table.add_column("license", overflow="fold")
    for p in all_presets().values():
        table.add_row(p.name, p.repo, p.parameters, p.dtype, p.card.license or "")
    out.print(table)


_signal_received: list[int] = []
"""The first SIGINT/SIGTERM of this run (the exit code is 128 + its number)."""


def _on_signal(signum, frame) -> None:
    """SIGINT and SIGTERM (a CI job's timeout) both unwind as KeyboardInterrupt, so cleanups run."""
    if not _signal_received:
        _signal_received.append(signum)
    raise KeyboardInterrupt


def _run_app() -> int:
    """Run the command; return its exit code. Every way out of `int8` goes through here."""
    try:
        rc = app(standalone_mode=False)
    except Int8Error as e:
        console.print("[bold red]Error:[/] " + _escape(e.message), markup=True)
        if e.hint:
            console.print(f"[dim]{_escape(e.hint)}[/]", markup=True)
        return e.exit_code
    except KeyboardInterrupt:
        rc = 130
    except typer.Exit as e:
        rc = e.exit_code
    except typer.Abort:
        rc = 130 if _signal_received else 1
        if not _signal_received:
            console.print("Aborted.")
    except typer.TyperException as e:  # a bad option value or usage: one line, and where to look
        if not hasattr(e, "format_message"):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # `int8` or `int8 convert` alone: the help
            e.show()
            return getattr(e, "exit_code", 2)
        console.print("[bold red]Error:[/] " + _escape(e.format_message()), markup=True)
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            console.print(f"[dim]Run '{_escape(ctx.command_path)} --help' for the options.[/]", markup=True)
        return getattr(e, "exit_code", 2)
    if _signal_received or rc == 130:
        signum = _signal_received[0] if _signal_received else signal.SIGINT
        console.print("[bold red]Interrupted.[/]", markup=True)
        return 128 + int(signum)
    return rc if isinstance(rc, int) else 0


def main() -> None:
    """Entry point of the `int8` console script: exit 0 on success, 1 for a failed check, 2 for a
    user error, 130 after Ctrl-C and 143 after SIGTERM (once the run has cleaned up after itself)."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        rc = _run_app()
    except KeyboardInterrupt:  # a second signal while the first was being handled
        rc = 128 + (_signal_received[0] if _signal_received else int(signal.SIGINT))
    sys.exit(rc)


if __name__ == "__main__":
    main()
