"""`int8 push`: publish a converted folder to the Hub, after verify's quick checks pass.

The upload is ``huggingface_hub``'s ``upload_folder``: large files go through
LFS, and a re-run after an interruption sends only what the Hub does not have
yet (the LFS batch call answers which objects it already holds). The token
comes from the caller, ``HF_TOKEN`` or the stored login (`hf auth login`); it
is handed to the client and never printed, logged or written anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import HubError, Int8Error, SourceNotFound, VerificationFailed
from ..verify.result import VERIFY_NAME, Record, RecordState, read_record
from .errors import NO_TOKEN, TOKEN_HINT
from .redact import redact

IGNORE_PATTERNS = [".*", "**/.*", "*.int8-tmp"]
"""Never uploaded: hidden files (editor swap files, half-written temporaries, caches)."""


@dataclass(frozen=True)
class PushResult:
    """Where the checkpoint went."""

    repo_id: str
    repo_url: str
    commit_url: str
    commit: str
    revision: str | None = None
    pr_url: str | None = None


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    message: str | None = None,
    token: str | None = None,
    quiet: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PushResult:
    """Verify ``folder`` (quick checks), then upload it to the model repo ``repo_id``.

    Creates the repo (``private`` if asked) unless ``create_pr``, which opens a
    pull request on an existing repo instead; ``revision`` is the branch to
    commit to (created from main when missing) or, with ``create_pr``, the
    branch the PR targets. ``repo_id`` without an owner goes to the token's own
    namespace. ``quiet`` hides huggingface_hub's upload bars; ``progress`` is
    told each step (and the warnings).

    In order, and nothing is sent or changed in the folder before the checks pass:
    verify's quick checks (structure, integrity, every file that would be
    uploaded is in the manifest); the latest recorded full `int8 verify`
    (``int8_verify.json``): a failed one refuses the push, one that is stale
    (made for other files than the manifest now lists) or invalid is neither
    shown in the card nor uploaded, with a warning; then README.md is rendered
    in memory (snippets loading ``repo_id``, the fidelity figures of a current
    record) and uploaded with the files; the folder's README.md is replaced by
    it only once the upload went through.

    Raises `int8.errors.VerificationFailed` when the quick checks fail or the
    recorded full verify failed (nothing is sent) and `int8.errors.HubError`
    for a missing or rejected token, no write access, a malformed repo id, or
    a network failure.
    """
    from huggingface_hub import HfApi

    from ..files import CARD_NAME
    from .card import load_report, render_for_folder, save_card
    from .download import progress_bars
    from .timeouts import bounded, metadata_timeout, transfer_timeout

    say = progress or (lambda _msg: None)
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceNotFound(f"folder {folder} does not exist", "Give the folder that `int8 convert` wrote.")
    refuse_others(folder)
    repo_id, token = check_can_push(repo_id, token)
    api = HfApi(token=token)

    report = load_report(folder)
    say("Running int8 verify's quick checks")
    _verify(folder)
    record = _check_record(folder, report)
    if record.state in (RecordState.STALE, RecordState.INVALID):
        say(f"Warning: {record.why}: it is not shown in the card nor published; run `int8 verify {folder.name}` again")
    say(f"Rendering the model card for {repo_id}")
    card = render_for_folder(folder, repo_id=repo_id)
    skip = {CARD_NAME} | ({VERIFY_NAME} if record.state in (RecordState.STALE, RecordState.INVALID) else set())
    operations = _operations(folder, skip, card.encode("utf-8"))

    try:
        with bounded(transfer_timeout()):
            if create_pr:
                api.repo_info(repo_id, timeout=metadata_timeout())  # a PR needs a repo to be opened on
            else:
                api.create_repo(repo_id, private=private, exist_ok=True)
                if revision:
                    api.create_branch(repo_id, branch=revision, exist_ok=True)
            say(f"Uploading {folder} to {repo_id}" + (f" ({revision})" if revision else ""))
            with progress_bars(not quiet):
                info = api.create_commit(
                    repo_id=repo_id,
                    operations=operations,
                    commit_message=message or _default_message(report),
                    revision=revision,
                    create_pr=create_pr,
                )
    except Exception as e:
        raise translate_push_error(e, repo_id, revision=revision, create_pr=create_pr) from None
    save_card(folder, card)  # the folder's card is what was published
    return PushResult(
        repo_id=repo_id,
        repo_url=redact(str(info.repo_url)),
        commit_url=redact(info.commit_url),
        commit=info.oid,
        revision=info.pr_revision if create_pr else revision,
        pr_url=redact(info.pr_url) if info.pr_url else None,
    )


def refuse_others(folder: Path) -> None:
    """Publish int8's own conversions only: their card and the manifest push checks come from int8_report.json.

    A checkpoint another tool wrote (`int8.verify.provenance`) is refused before any token is asked for, and
    so is an int8 output whose report was removed (its card still says int8 wrote it)."""
    from ..report import REPORT_NAME
    from ..verify.provenance import NO_MARKS, read_origin

    origin = read_origin(folder)
    if not origin.own:
        raise Int8Error(
            f"{folder} was not written by `int8 convert` ({NO_MARKS}): "
            "int8 push publishes int8's own conversions only, whose card and manifest it renders and checks",
            f"Check it with `int8 verify {folder} --against ORIGINAL`; publish it with `hf upload OWNER/NAME {folder}`.",
        )
    if origin.report_removed:
        raise Int8Error(
            f"{folder} was written by `int8 convert` (README.md is int8's card), but its {REPORT_NAME} is missing: "
            "nothing vouches for its files, so nothing was published",
            "Convert the model again (--overwrite) to write a fresh folder.",
        )


def pushed_files(folder: Path) -> list[str]:
    """Every file `push` considers (IGNORE_PATTERNS left out), relative to ``folder``, sub-folders included.

    A symlink to a folder is listed as ``NAME/`` (it is not walked)."""
    import fnmatch
    import os

    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        rel_root = Path(root).relative_to(folder)
        links = [d for d in dirs if (Path(root) / d).is_symlink()]
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in links]
        for name in [*files, *links]:
            rel = (rel_root / name).as_posix()
            if name.startswith(".") or any(fnmatch.fnmatch(rel, pat) for pat in IGNORE_PATTERNS):
                continue
            out.append(rel + ("/" if name in links else ""))
    return sorted(out)


def _operations(folder: Path, skip: set[str], card: bytes) -> list:
    from huggingface_hub import CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
           for rel in pushed_files(folder) if rel not in skip and not rel.endswith("/")]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    return ops


def _check_record(folder: Path, report) -> Record:
    """The latest recorded verify; a failed full verify of these very files refuses the push."""
    record = read_record(folder, report.files)
    if record.failed_full:
        failed = [c["name"] for c in record.data["checks"] if c["status"] == "fail"]
        raise VerificationFailed(
            f"the latest full int8 verify of {folder.name} failed ({', '.join(failed[:6])}), so nothing was published",
            f"Run `int8 verify {folder.name}` for details; fix the checkpoint (convert again with --overwrite) "
            "or pass --against SOURCE if the original was not found, then verify again.",
        )
    return record


def check_can_push(repo_id: str, token: str | None = None) -> tuple[str, str]:
    """Check what can be checked before any work: the repo id's form, a token, and that the
    Hub accepts it. Returns the full repo id (OWNER/NAME) and the token.
    `int8 convert --push` calls this before converting, so a missing token costs seconds, not a conversion."""
    from huggingface_hub import HfApi, get_token

    from .timeouts import bounded, metadata_timeout

    _check_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise HubError(NO_TOKEN, TOKEN_HINT)
    try:
        with bounded(metadata_timeout()):
            user = HfApi(token=token).whoami()
    except Exception as e:
        raise translate_push_error(e, repo_id) from None
    if "/" not in repo_id:
        repo_id = f"{user['name']}/{repo_id}"
    return repo_id, token


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise translate_push_error(e, repo_id) from None


def _verify(folder: Path) -> None:
    """verify's quick checks (structure, integrity); refuse to publish what fails them.

    The card check is left out: push renders and publishes a fresh card in any case."""
    from ..verify import verify_checkpoint

    result = verify_checkpoint(folder, quick=True)
    failed = [c for c in result.checks if c.failed and c.name != "card"]
    if not failed:
        return
    lines = [f"{c.name}: {c.detail or c.figure}" for c in failed[:5]]
    raise VerificationFailed(
        f"{folder} failed int8 verify's quick checks, so nothing was published:\n  " + "\n  ".join(lines),
        f"Run `int8 verify {folder}` for details; convert again (--overwrite) to repair the folder.",
    )


def _default_message(report) -> str:
    source = report.source.id if report.source.kind != "local" else Path(report.source.id).name
    return f"Upload int8 checkpoint of {source} (block size {report.quantization.block_size})"


def translate_push_error(e: Exception, repo_id: str, *, revision: str | None = None, create_pr: bool = False) -> BaseException:
    """The int8 error for a client exception raised while publishing to ``repo_id`` (see `int8.hub.errors`)."""
    from .errors import Operation, translate

    return translate(e, Operation.PUBLISH, repo_id, revision=revision, create_pr=create_pr)
