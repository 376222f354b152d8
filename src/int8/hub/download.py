"""Fetch a checkpoint from the Hub: one weights format, config, tokenizer, card.

Uses ``huggingface_hub`` as any Hub tool does: the normal cache (``HF_HOME``),
resumable downloads, ``HF_ENDPOINT``, ``HF_TOKEN`` or the stored login, and
offline mode (``HF_HUB_OFFLINE=1`` serves a previous download from the cache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import SIDECAR_FILES
from ..errors import NoWeightsFound

WEIGHT_PATTERNS = {
    "safetensors": ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
    "pytorch": ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"],
}
SIDECAR_PATTERNS = ["config.json", "README.md", *SIDECAR_FILES]
"""Files other than the weights that a converted checkpoint needs or that the card reads."""


@dataclass(frozen=True)
class Downloaded:
    folder: Path
    repo_id: str
    revision: str | None
    commit: str | None
    format: str


def weights_format(filenames: list[str]) -> str | None:
    """The format to download: safetensors when the repo has it, else PyTorch .bin."""
    names = set(filenames)
    if {"model.safetensors", "model.safetensors.index.json"} & names:
        return "safetensors"
    if {"pytorch_model.bin", "pytorch_model.bin.index.json"} & names:
        return "pytorch"
    return None


def download_checkpoint(
    repo_id: str, revision: str | None = None, token: str | bool | None = None, quiet: bool = False
) -> Downloaded:
    """Download what converting ``repo_id`` needs; return the local snapshot folder.

    Only one weights format is fetched (safetensors when the repo has it),
    with the config, tokenizer, generation config, license and card. A second
    run finds everything in the cache; with ``HF_HUB_OFFLINE=1`` it makes no
    request at all. Every request is bounded in time (see `int8.hub.timeouts`).
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    from .timeouts import bounded, metadata_timeout, transfer_timeout

    try:
        if constants.HF_HUB_OFFLINE:
            return _from_cache(repo_id, revision, token)
        with bounded(transfer_timeout()), progress_bars(not quiet):
            info = HfApi().model_info(repo_id, revision=revision, token=token, timeout=metadata_timeout())
            files = [s.rfilename for s in info.siblings or []]
            fmt = weights_format(files)
            if fmt is None:
                raise NoWeightsFound(
                    f"{repo_id}{'@' + revision if revision else ''} has no model.safetensors or pytorch_model.bin "
                    "weights (nor their sharded index)",
                    f"Files found: {', '.join(sorted(files)[:8]) or 'none'}.",
                )
            folder = Path(
                snapshot_download(
                    repo_id,
                    # by name, so that the client records branch/tag -> commit in the cache's refs/ itself
                    # (an offline run then finds the snapshot by name); the commit is the snapshot's own
                    revision=revision,
                    allow_patterns=WEIGHT_PATTERNS[fmt] + SIDECAR_PATTERNS,
                    token=token,
                    etag_timeout=metadata_timeout(),
                )
            )
        return Downloaded(folder, repo_id, revision, folder.name, fmt)
    except Exception as e:  # translate the client's errors into ones that say what to do
        raise translate_hub_error(e, repo_id, revision) from None


@contextlib.contextmanager
def progress_bars(show: bool) -> Iterator[None]:
    """huggingface_hub's progress bars (downloads, uploads), off for --quiet; the user's own setting is restored after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not show and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            enable_progress_bars()


def _from_cache(repo_id: str, revision: str | None, token) -> Downloaded:
    """Offline: the snapshot an earlier run downloaded, in the format it chose, with no request."""
    from huggingface_hub import snapshot_download

    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:  # huggingface_hub < 2: no tree cache, no completeness check; the snapshot says
        get_cached_repo_tree = None
    if get_cached_repo_tree is not None:
        files = [f.path for f in get_cached_repo_tree(repo_id, revision=revision)]
    else:
        any_format = WEIGHT_PATTERNS["safetensors"] + WEIGHT_PATTERNS["pytorch"] + SIDECAR_PATTERNS
        snap = snapshot_download(repo_id, revision=revision, allow_patterns=any_format, local_files_only=True)
        files = [p.name for p in Path(snap).iterdir()]
    fmt = weights_format(files)
    if fmt is None:
        raise NoWeightsFound(f"the cached copy of {repo_id} has no weights", "Run once without HF_HUB_OFFLINE=1.")
    folder = Path(
        snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=WEIGHT_PATTERNS[fmt] + SIDECAR_PATTERNS,
            token=token,
            local_files_only=True,
        )
    )
    return Downloaded(folder, repo_id, revision, folder.name, fmt)


def translate_hub_error(e: Exception, repo_id: str, revision: str | None = None) -> BaseException:
    """The int8 error for a client exception raised while fetching ``repo_id`` (see `int8.hub.errors`)."""
    from .errors import Operation, translate

    return translate(e, Operation.FETCH, repo_id, revision=revision)
