"""Where the checkpoint to verify is, and where its original is.

The target is a local folder or a Hub repo id; a repo is downloaded with
``huggingface_hub`` (the normal cache, resumable, ``HF_ENDPOINT``,
``HF_TOKEN``, offline mode) as `int8 convert` downloads its sources, except
that everything the repo holds is fetched (other frameworks' weight files
apart): the manifest decides what belongs.

The original is what ``--against`` names (a preset, a Hub id or a folder),
else the source recorded in ``int8_report.json`` (a preset or Hub id at the
commit it was converted from, or the local folder, when it still exists), else
the card's ``base_model``. When no original was named and the recorded one
cannot be reached, the fidelity checks are skipped and say why; an original
that was named and cannot be reached is a usage error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import Int8Error, SourceNotFound
from ..report import REPORT_NAME


@dataclass(frozen=True)
class Target:
    folder: Path
    kind: str  # "local" or "hub"
    id: str
    revision: str | None = None
    commit: str | None = None


@dataclass(frozen=True)
class Original:
    folder: Path | None  # None: not reachable (then `why` says why)
    id: str | None
    why: str = ""


def resolve_target(target: str | Path, revision: str | None = None, token: str | bool | None = None) -> Target:
    """A local folder or a Hub repo id -> a local folder holding the converted checkpoint."""
    from ..sources import _REPO_ID, looks_like_path

    text = str(target)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceNotFound(f"{text} is a file; int8 verify checks a converted checkpoint folder")
        if revision:
            raise Int8Error(f"--revision {revision} applies to Hub repos, and {text} is a local folder")
        return Target(path.resolve(), "local", str(path.resolve()))
    if isinstance(target, Path) or looks_like_path(text) or not _REPO_ID.match(text) or "/" not in text:
        raise SourceNotFound(
            f"{text} is neither a folder nor a Hub repo id (owner/name)",
            "Give the folder that `int8 convert` wrote, or the repo it was pushed to.",
        )
    return _download(text, revision, token)


def _download(repo_id: str, revision: str | None, token) -> Target:
    from huggingface_hub import HfApi, constants, snapshot_download

    from ..checkpoint import FOREIGN_WEIGHTS
    from ..hub.download import translate_hub_error
    from ..hub.timeouts import bounded, metadata_timeout, transfer_timeout

    ignore = list(FOREIGN_WEIGHTS)
    try:
        if constants.HF_HUB_OFFLINE:
            folder = snapshot_download(
                repo_id, revision=revision, token=token, ignore_patterns=ignore, local_files_only=True
            )
            return Target(Path(folder), "hub", repo_id, revision, Path(folder).name)
        with bounded(transfer_timeout()):  # a Hub that never answers is an error, not a hang
            info = HfApi().model_info(repo_id, revision=revision, token=token, timeout=metadata_timeout())
            folder = snapshot_download(
                repo_id, revision=info.sha, token=token, ignore_patterns=ignore, etag_timeout=metadata_timeout()
            )
        return Target(Path(folder), "hub", repo_id, revision, info.sha)
    except Exception as e:  # the client's errors, said in int8's words
        raise translate_hub_error(e, repo_id, revision) from None


def _card_base_model(folder: Path) -> str | None:
    card = folder / "README.md"
    if not card.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        base = ModelCard.load(card).data.to_dict().get("base_model")
    except Exception:
        return None
    if isinstance(base, list):
        base = base[0] if base else None
    return base if isinstance(base, str) else None


def recorded_original(folder: Path) -> tuple[str | None, str | None, str]:
    """(source, revision, how it is known) from the conversion report, else the card."""
    try:
        source = json.loads((folder / REPORT_NAME).read_text())["source"]
        kind, ident = source["kind"], source["id"]
        if kind == "local":
            return ident, None, f"the source folder recorded in {REPORT_NAME}"
        return ident, source.get("commit") or source.get("revision"), f"the source recorded in {REPORT_NAME}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    base = _card_base_model(folder)
    if base:
        return base, None, "the card's base_model"
    return None, None, ""


def resolve_original(
    folder: Path, against: str | Path | None, token: str | bool | None = None, quiet: bool = True
) -> Original:
    """The original checkpoint's local folder (downloading it if needed), or why there is none."""
    from ..sources import resolve_source

    if against is not None:
        got = resolve_source(str(against), token=token, quiet=quiet)  # errors here are the user's to fix
        return Original(got.folder, str(against))
    ident, revision, how = recorded_original(folder)
    if ident is None:
        return Original(None, None, "no original recorded in int8_report.json or the card; pass --against")
    local = Path(ident)
    if local.is_absolute() or ident.startswith((".", "~")):
        if local.is_dir():
            return Original(local, ident)
        return Original(None, ident, f"{how}, {ident}, no longer exists; pass --against")
    try:
        got = resolve_source(ident, revision=revision, token=token, quiet=quiet)
    except Int8Error as e:
        return Original(None, ident, f"{how}, {ident}, cannot be reached ({e.message}); pass --against")
    return Original(got.folder, ident)
