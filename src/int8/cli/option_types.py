"""The options and arguments several commands take, declared once as `Annotated` types.

A command annotates its parameter with one of these (``device: ConvertDevice = "auto"``), as
huggingface_hub's CLI does. The flag names, short forms, metavars and parse-time checks live
here; where an option means something slightly different per command (--device of a conversion
or of a model run, --revision of a source or of the branch pushed to), the command words its help
through the factory, so that each command's help text stays its own.
"""

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import options

ConvertedFolder = Annotated[Path, typer.Argument(help="A folder written by `int8 convert`.", show_default=False)]
"""The folder argument of `int8 push` and `int8 card`."""


def device_option(help: str) -> Any:
    """--device: auto (a GPU if there is one), cpu, cuda or cuda:N; resolved by `int8.hf.resolve_device`."""
    return Annotated[str, typer.Option("--device", help=help)]


def revision_option(help: str, *, metavar: str | None = None) -> Any:
    """--revision: a Hub branch, tag or commit (refused for a local folder, see `options.local_revision`)."""
    return Annotated[Optional[str], typer.Option("--revision", help=help, metavar=metavar, show_default=False)]


def quiet_option(help: str) -> Any:
    """--quiet / -q: no progress; what else is left out is the command's to say."""
    return Annotated[bool, typer.Option("--quiet", "-q", help=help)]


def repo_option(help: str) -> Any:
    """--repo ID: a Hub model repo, OWNER/NAME or NAME (required where the parameter has no default)."""
    return Annotated[Optional[str], typer.Option("--repo", help=help, metavar="ID", show_default=False)]


def json_option(help: str) -> Any:
    """--json FILE: a result written as JSON, to a file in an existing folder (checked while parsing)."""
    return Annotated[
        Optional[Path], typer.Option("--json", help=help, metavar="FILE", show_default=False, callback=options.json_output)
    ]


def _checked_dtype(value: str | None) -> str | None:
    """A dtype option's value as typed, once `int8.hf.parse_dtype` accepts it (a UsageError, exit 2, otherwise)."""
    from ..hf import parse_dtype

    if value is not None:
        parse_dtype(value)
    return value


def dtype_option(flag: str, help: str) -> Any:
    """A floating dtype option (fp32, fp16 or bf16; torch names too), refused while parsing when it is none of them."""
    return Annotated[
        Optional[str], typer.Option(flag, help=help, metavar="fp32|fp16|bf16", show_default=False, callback=_checked_dtype)
    ]


def _checked_embeddings(value: str) -> str:
    """--embeddings as typed, once `options.embeddings` accepts it (keep or int8; a UsageError, exit 2, otherwise)."""
    return options.embeddings(value).value


def embeddings_option(help: str) -> Any:
    """--embeddings keep|int8: whether the token embeddings and the output head are quantized too."""
    return Annotated[str, typer.Option("--embeddings", help=help, metavar="keep|int8", callback=_checked_embeddings)]
