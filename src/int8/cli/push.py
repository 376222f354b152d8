"""`int8 push` and `int8 card`: thin layers over `int8.hub.upload.push` and `int8.hub.card.rewrite_card`."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from .display import out, say
from .option_types import ConvertedFolder, quiet_option, repo_option, revision_option

PushRepo = repo_option("The model repo to publish to: OWNER/NAME, or NAME for your own namespace.")
CardRepo = repo_option("Repo id the usage snippets load. Default: the one the card already names (after a push), else NAME-int8.")
Branch = revision_option(
    "Branch to commit to (created from main when missing); with --create-pr, the branch the pull request targets.",
    metavar="BRANCH",
)
Quiet = quiet_option("No progress; print only the commit (and PR) URL.")


def publish(folder: Path, repo: str, quiet: bool = False, **kwargs) -> None:
    """Push ``folder`` to ``repo`` and print where it went (`int8 push`, and `int8 convert --push`)."""
    from ..hub.upload import push as run_push

    result = run_push(folder, repo, quiet=quiet, progress=None if quiet else say, **kwargs)
    lines = [result.commit_url] + ([result.pr_url] if result.pr_url else [])
    if not quiet:
        lines = [
            f"Published to {result.repo_url}" + (f" (branch {result.revision})" if result.revision else ""),
            f"commit: {result.commit_url}",
        ] + ([f"pull request: {result.pr_url}"] if result.pr_url else [])
    for line in lines:  # URLs whole on one line each, for people and for scripts
        out.print(line, soft_wrap=True, markup=False)


def push(
    path: ConvertedFolder,
    repo: PushRepo,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")] = False,
    revision: Branch = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request on an existing repo instead of committing.")] = False,
    message: Annotated[
        Optional[str], typer.Option("--message", "-m", help="Commit message.", metavar="TEXT", show_default=False)
    ] = None,
    quiet: Quiet = False,
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
    publish(path, repo, quiet=quiet, private=private, revision=revision, create_pr=create_pr, message=message)


def card(path: ConvertedFolder, repo: CardRepo = None) -> None:
    """Write the folder's model card (README.md) again from int8_report.json and the latest int8_verify.json.

    Metadata (base_model, license, languages, datasets, pipeline tag) is kept from the current card,
    else taken from the original's card or the preset.
    """
    from ..hub.card import rewrite_card

    written = rewrite_card(path, repo_id=repo)
    out.print(f"Wrote {written}")
