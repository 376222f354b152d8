"""The `int8` command line: a thin layer over the library (`int8.convert`, `int8.verify`, ...).

Every user mistake ends with a one-paragraph message, a hint, and exit code 2;
a traceback means a bug in int8.

The package: this module holds the app, the commands' registration and `main` (the single way
out, with the signal handling and error printing); `option_types` the options several commands
share; `display` the consoles and the progress bar; one module per command (`convert`, `verify`,
`push` with `card`, `generate`, `presets`). `int8 --help` imports neither torch nor transformers:
the commands import the library when they run. The modules here evaluate their annotations where they are
defined (no ``from __future__ import annotations``): typer reads every command's signature on every run, and
string annotations would be compiled and evaluated again each time (some 270 of them).
"""

import gc
import os
import signal
import sys
import threading
from typing import Annotated

import typer
from rich.markup import escape as _escape

from .. import __version__
from ..errors import Int8Error
from . import convert, generate, presets, push, verify
from .display import console, out

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


app.command(epilog=convert.epilog())(convert.convert)
app.command()(push.push)
app.command()(push.card)
app.command()(verify.verify)
app.command()(generate.generate)
app.command()(presets.presets)


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


def _set_environment(args: list[str], environ) -> None:
    """Defaults for the libraries the command loads, set before they load (a user's own setting wins)."""
    environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args[:1] == ["convert"]:
        # A conversion never calls BLAS, but numpy's OpenBLAS starts a thread per core on import, and they spin:
        # 0.25 s of CPU taken from the workers in a 2 GB conversion on 2 cores (measured).
        environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _defer_garbage_collection(seconds: float = 1.0) -> None:
    """No cyclic garbage collection for the command's first ``seconds``: what is allocated then is mostly modules
    being imported (numpy, pydantic, huggingface_hub, int8), which live as long as the process, and the
    collector's repeated scans of them took about 15 ms of a 0.4 s conversion (README's bench/convert). A
    conversion leaves a few hundred cyclic objects a second at most (measured with and without the progress
    bar), so a longer command gets the collector back with little to catch up on."""
    gc.disable()
    timer = threading.Timer(seconds, gc.enable)
    timer.daemon = True
    timer.start()


def main() -> None:
    """Entry point of the `int8` console script: exit 0 on success, 1 for a failed check, 2 for a
    user error, 130 after Ctrl-C and 143 after SIGTERM (once the run has cleaned up after itself)."""
    _defer_garbage_collection()
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    _set_environment(sys.argv[1:], os.environ)
    try:
        rc = _run_app()
    except KeyboardInterrupt:  # a second signal while the first was being handled
        rc = 128 + (_signal_received[0] if _signal_received else int(signal.SIGINT))
    # The command is over and every file it wrote is closed: spare the interpreter's final garbage collection
    # over everything imported (numba, llvmlite, torch...), which takes longer than converting a small model.
    gc.freeze()
    sys.exit(rc)
