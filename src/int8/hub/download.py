"""Fetch a checkpoint from the Hub: one weights format, config, tokenizer, card.

Uses ``huggingface_hub`` as any Hub tool does: the normal cache (``HF_HOME``),
resumable downloads, ``HF_ENDPOINT``, ``HF_TOKEN`` or the stored login, and
offline mode (``HF_HUB_OFFLINE=1`` serves a previous download from the cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import HubError, NoWeightsFound, SourceNotFound

WEIGHT_PATTERNS = {
    "safetensors": ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
    "pytorch": ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"],
}
SIDECAR_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template.*",
    "README.md",
    "LICENSE*",
]
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
    """Download what converting ``repo_id`` needs; return the local snapshot folder."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from huggingface_hub import constants

    try:
        if constants.HF_HUB_OFFLINE:
            return _from_cache(repo_id, revision, token)
        info = HfApi().model_info(repo_id, revision=revision, token=token)
        files = [s.rfilename for s in info.siblings or []]
        fmt = weights_format(files)
        if fmt is None:
            raise NoWeightsFound(
                f"{repo_id}{'@' + revision if revision else ''} has no model.safetensors or pytorch_model.bin "
                "weights (nor their sharded index)",
                f"Files found: {', '.join(sorted(files)[:8]) or 'none'}.",
            )
        if not quiet:
            enable_progress_bars()
        else:
            disable_progress_bars()
        folder = snapshot_download(
            repo_id,
            revision=info.sha,
            allow_patterns=WEIGHT_PATTERNS[fmt] + SIDECAR_PATTERNS,
            token=token,
        )
        return Downloaded(Path(folder), repo_id, revision, info.sha, fmt)
    except Exception as e:  # translate the client's errors into ones that say what to do
        raise translate_hub_error(e, repo_id, revision) from None


def _from_cache(repo_id: str, revision: str | None, token) -> Downloaded:
    from huggingface_hub import snapshot_download

    folder = Path(
        snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=WEIGHT_PATTERNS["safetensors"] + WEIGHT_PATTERNS["pytorch"] + SIDECAR_PATTERNS,
            token=token,
            local_files_only=True,
        )
    )
    fmt = weights_format([p.name for p in folder.iterdir()])
    if fmt is None:
        raise NoWeightsFound(f"the cached copy of {repo_id} has no weights", "Run once without HF_HUB_OFFLINE=1.")
    return Downloaded(folder, repo_id, revision, folder.name, fmt)


def translate_hub_error(e: Exception, repo_id: str, revision: str | None = None) -> Exception:
    """Map huggingface_hub / network exceptions onto int8's user errors."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from ..errors import Int8Error

    if isinstance(e, Int8Error):
        return e
    endpoint = constants.ENDPOINT
    if isinstance(e, RevisionNotFoundError):
        return SourceNotFound(
            f"revision {revision!r} does not exist in {repo_id}", "Use a branch name, a tag or a full commit hash."
        )
    if isinstance(e, GatedRepoError):
        return HubError(f"{repo_id} is gated: accept its terms on the Hub with your account, then retry with HF_TOKEN set")
    if isinstance(e, RepositoryNotFoundError):
        return SourceNotFound(
            f"{repo_id!r} is not a preset, a local folder, or a model repo on {endpoint}",
            "Check the spelling (`int8 presets` lists presets). If the repo is private, set HF_TOKEN or run `hf auth login`.",
        )
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return HubError(
            f"{repo_id} is not in the local cache and the Hub cannot be reached ({endpoint})",
            "Connect to the network (or unset HF_HUB_OFFLINE) and retry.",
        )
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return HubError(
                f"the Hub rejected the token (401) while fetching {repo_id}",
                "Check HF_TOKEN (or `hf auth login`): the token is invalid or expired.",
            )
        if status == 403:
            return HubError(f"access to {repo_id} was refused (403)", "Your token lacks read access to this repo.")
        return HubError(f"the Hub answered an error for {repo_id}: {str(e).splitlines()[0]}")
    if _is_network_error(e):
        return HubError(
            f"cannot reach the Hub at {endpoint} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            "Check the network (and HF_ENDPOINT). A model downloaded before is served offline with HF_HUB_OFFLINE=1.",
        )
    return e


def _is_network_error(e: BaseException) -> bool:
    """Connection refused, DNS failure, timeout: whatever HTTP client huggingface_hub uses."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TransportError", "TimeoutException", "ConnectError", "NetworkError"}) or isinstance(
        e, (OSError, TimeoutError)
    )
