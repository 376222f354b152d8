"""Where the checkpoint to verify is, and where its original is.

The target is a local folder or a Hub repo id; a repo is downloaded with
``huggingface_hub`` (the normal cache, resumable, ``HF_ENDPOINT``,
``HF_TOKEN``, offline mode) as `int8 convert` downloads its sources, except
that everything the repo holds is fetched (other frameworks' weight files
apart): the manifest decides what belongs.

The original is what ``--against`` names (a preset, a Hub id or a folder),
else the source recorded in ``int8_report.json`` (a preset or Hub id at the
commit it was converted from, or the local folder of that name beside the
converted one), else the card's ``base_model``. When no original was named and
the recorded one cannot be reached, the ``original`` check fails and says why
(a full verify passes only when fidelity ran); an original that was named and
cannot be reached is a usage error.
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
        return Target(path.resolve(), "local", path.resolve().name or text)
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
    kind, ident, revision, how = _recorded(folder)
    return ident, revision, how


def _recorded(folder: Path) -> tuple[str | None, str | None, str | None, str]:
    """(kind, source, revision, how it is known): the report's source, else the card's base_model."""
    try:
        source = json.loads((folder / REPORT_NAME).read_text())["source"]
        kind, ident = source["kind"], source["id"]
        if isinstance(kind, str) and isinstance(ident, str) and ident:
            if kind == "local":
                return kind, ident, None, f"the source folder recorded in {REPORT_NAME}"
            revision = source.get("commit") or source.get("revision")
            return kind, ident, revision if isinstance(revision, str) else None, f"the source recorded in {REPORT_NAME}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    base = _card_base_model(folder)
    if base:
        return "hub", base, None, "the card's base_model"
    return None, None, None, ""


def public_id(ident: str | Path) -> str:
    """What results and reports may say of a source: a Hub id or preset as is, a local folder by its name only."""
    text = str(ident)
    path = Path(text).expanduser()
    if isinstance(ident, Path) or path.is_absolute() or text.startswith((".", "~")) or path.is_dir():
        return path.resolve().name or text
    return text


def resolve_original(
    folder: Path, against: str | Path | None, token: str | bool | None = None, quiet: bool = True, local: bool = True
) -> Original:
    """The original checkpoint's local folder (downloading it if needed), or why there is none.

    A local source is recorded by its folder name (no absolute path is
    published): it is looked for beside the converted folder, in the same
    parent folder, and only for a local target.
    """
    from ..sources import resolve_source

    if against is not None:
        got = resolve_source(str(against), token=token, quiet=quiet)  # errors here are the user's to fix
        return Original(got.folder, public_id(against))
    kind, ident, revision, how = _recorded(folder)
    if ident is None:
        return Original(None, None, f"no original is recorded in {REPORT_NAME} or the card")
    if kind == "local":
        return _local_original(folder, ident, how, local)
    try:
        got = resolve_source(ident, revision=revision, token=token, quiet=quiet)
    except Int8Error as e:
        return Original(None, ident, f"{how}, {ident}, cannot be reached ({e.message})")
    return Original(got.folder, ident)


def _local_original(folder: Path, ident: str, how: str, local: bool) -> Original:
    name = Path(ident).name
    if not local:
        return Original(None, name, f"{how}, {name}, is a local folder of whoever converted it")
    path = Path(ident)
    if path.is_absolute():  # a report written before int8 recorded names only
        candidate = path
    elif ident == name and name not in ("", ".", ".."):
        candidate = folder.parent / name
    else:
        return Original(None, name, f"{how}, {ident!r}, is not a folder name")
    if candidate.is_dir():
        return Original(candidate, name)
    return Original(None, name, f"{how}, {name}, is not beside the checkpoint (no folder {name} in {folder.parent.name or '.'})")
