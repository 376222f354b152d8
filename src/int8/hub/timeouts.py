"""How long int8 waits for the Hub, so that a server that never answers is an error, not a hang.

``huggingface_hub`` sends some requests with no timeout at all (``repo_info``,
``list_repo_tree``, ``whoami``, ``create_repo``, the commit call): against a
server that accepts the connection and never answers they wait forever.
int8 passes ``timeout=`` where the client takes one and, around every Hub
operation (:func:`bounded`), fills in a timeout on the requests that have none
and shortens longer ones.

How: through the library's public extension point, ``set_client_factory``.
On its first Hub operation int8 installs a factory that builds the client the
factory in place would build (huggingface_hub's default: its own request hook,
redirects followed, no default timeout; or a factory the user set, e.g. for a
proxy) and adds one request hook, `bound_request`. That hook does nothing
unless an int8 operation is running: the operation's bound is a context
variable set by :func:`bounded`, so another library's requests in the same
process are not touched. huggingface_hub's worker threads (the parallel file
downloads of ``snapshot_download``, the LFS uploads) inherit no context
variables, so a request from a thread with none is bounded by the int8
operations running at that moment, if any. The shared session is never
patched; int8 does not bound the async client (it does not use it).

``INT8_HUB_TIMEOUT`` (seconds) sets both bounds below; without it, metadata
requests wait ``HF_HUB_ETAG_TIMEOUT`` (10 s unless set) and transfers and
commits wait the larger of 60 s and ``HF_HUB_DOWNLOAD_TIMEOUT``. A timeout
is the longest silence tolerated (connect, or between two reads), not the
length of a whole download.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

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


_BOUND: ContextVar[float | None] = ContextVar("int8_hub_timeout", default=None)
"""The bound of the int8 Hub operation running in this context (None: none is)."""
_ACTIVE: list[float] = []
"""The bounds of every int8 Hub operation running in the process, for the client's worker threads (see below)."""
_LOCK = threading.Lock()


@contextlib.contextmanager
def bounded(timeout: float) -> Iterator[None]:
    """Bound every request huggingface_hub sends for this operation to ``timeout`` s of silence.

    Requests sent with no timeout get this one; longer ones are shortened to it
    (the client retries a file's metadata with a fixed 60 s timeout, five times).
    """
    install()
    token = _BOUND.set(timeout)
    with _LOCK:
        _ACTIVE.append(timeout)
    try:
        yield
    finally:
        _BOUND.reset(token)
        with _LOCK:
            _ACTIVE.remove(timeout)


def current_bound() -> float | None:
    """The bound for a request sent now from this thread: its context's, else (a worker thread the client
    started, which inherits no context) the tightest of the int8 operations running; None outside them."""
    timeout = _BOUND.get()
    if timeout is not None:
        return timeout
    with _LOCK:
        return min(_ACTIVE) if _ACTIVE else None


def bound_request(request) -> None:
    """The request hook of int8's client: fill in or shorten the request's timeouts while an int8 operation runs."""
    timeout = current_bound()
    if timeout is None:
        return
    current = request.extensions.get("timeout")
    if not isinstance(current, dict):
        current = {}
    keys = ("connect", "read", "write", "pool")
    request.extensions["timeout"] = {k: timeout if current.get(k) is None else min(current[k], timeout) for k in keys}


def install() -> None:
    """Make huggingface_hub build its shared client with `bound_request` among its request hooks (once).

    The client is the one the factory in place would build (the library's default, or one the user
    set): int8 wraps that factory, through ``set_client_factory``, and adds its hook to the client it
    returns. A factory set later replaces int8's; the next operation wraps it in turn."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    with _LOCK:
        current = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
        if getattr(current, "int8_bounded", False):
            return
        set_client_factory(_bounded_factory(current))


def _bounded_factory(base: Callable[[], Any]) -> Callable[[], Any]:
    def factory():
        client = base()
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), bound_request]}
        return client

    factory.int8_bounded = True  # type: ignore[attr-defined]
    return factory
