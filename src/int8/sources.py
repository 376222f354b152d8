"""Turn what the user typed (preset, local folder, Hub id) into a local folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceNotFound
from .presets import Preset, get_preset, suggest

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ResolvedSource:
    folder: Path
    kind: str  # "preset", "hub" or "local"
    id: str  # repo id or local path
    preset: Preset | None = None
    revision: str | None = None
    commit: str | None = None


def looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1


def resolve_source(
    source: str, revision: str | None = None, token: str | bool | None = None, quiet: bool = False
) -> ResolvedSource:
    """A preset name, a local folder or a Hub repo id -> a local folder with the checkpoint."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceNotFound(f"{source} is a file; int8 converts a checkpoint folder (config.json and weights)")
        return ResolvedSource(path.resolve(), "local", str(path.resolve()))
    preset = get_preset(source)
    if preset is not None:
        from .hub.download import download_checkpoint

        got = download_checkpoint(preset.repo, revision or preset.revision, token, quiet)
        return ResolvedSource(got.folder, "preset", preset.repo, preset, got.revision, got.commit)
    if looks_like_path(source) or not _REPO_ID.match(source):
        raise SourceNotFound(f"folder {source} does not exist")
    if "/" not in source and (near := suggest(source)):
        # A bare name close to a preset is a typo far more often than a legacy Hub id.
        raise SourceNotFound(
            f"{source!r} is not a preset, a local folder, or a Hub repo id (owner/name)",
            f"Did you mean {' or '.join(near)}? `int8 presets` lists the presets.",
        )
    from .hub.download import download_checkpoint

    got = download_checkpoint(source, revision, token, quiet)
    return ResolvedSource(got.folder, "hub", source, None, got.revision, got.commit)
