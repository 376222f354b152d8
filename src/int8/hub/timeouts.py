"""How long int8 waits for the Hub, so that a server that never answers is an error, not a hang.

``huggingface_hub`` sends some requests with no timeout at all (``repo_info``,
``list_repo_tree``, ``whoami``, ``create_repo``, the commit call): against a
server that accepts the connection and never answers they wait forever.
int8 passes ``timeout=`` where the client takes one and, around every Hub
operation, fills in a timeout on the requests that have none and shortens
longer ones (:func:`bounded`).

``INT8_HUB_TIMEOUT`` (seconds) sets both bounds below; without it, metadata
requests wait ``HF_HUB_ETAG_TIMEOUT`` (10 s unless set) and transfers and
commits wait the larger of 60 s and ``HF_HUB_DOWNLOAD_TIMEOUT``. A timeout
is the longest silence tolerated (connect, or between two reads), not the
length of a whole download.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ..errors import Int8Error

ENV = "INT8_HUB_TIMEOUT"


def _env_timeout() -> float | None:
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise Int8Error(f"{ENV}={text!r} is not a number of seconds", f"Set {ENV} to a positive number, e.g. 30.")
    return value


def metadata_timeout() -> float:
    """Seconds to wait for a small answer (repo info, whoami, a file's metadata)."""
    from huggingface_hub import constants

    return _env_timeout() or float(constants.HF_HUB_ETAG_TIMEOUT)


def transfer_timeout() -> float:
    """Seconds of silence tolerated during a download, an upload or a commit."""
    from huggingface_hub import constants

    return _env_timeout() or max(60.0, float(constants.HF_HUB_DOWNLOAD_TIMEOUT))


@contextlib.contextmanager
def bounded(timeout: float) -> Iterator[None]:
    """Bound every request huggingface_hub sends meanwhile to ``timeout`` s of silence.

    Requests sent with no timeout get this one; longer ones are shortened to it
    (the client retries a file's metadata with a fixed 60 s timeout, five times).
    """
    from huggingface_hub import get_session

    client = get_session()

    def fill(request) -> None:
        current = request.extensions.get("timeout")
        if not isinstance(current, dict):
            current = {}
        keys = ("connect", "read", "write", "pool")
        request.extensions["timeout"] = {k: timeout if current.get(k) is None else min(current[k], timeout) for k in keys}

    hooks = client.event_hooks
    client.event_hooks = {**hooks, "request": [*hooks.get("request", []), fill]}
    try:
        yield
    finally:
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [h for h in hooks.get("request", []) if h is not fill]}
