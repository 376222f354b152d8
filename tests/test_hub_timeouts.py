"""int8 bounds the Hub client's requests through huggingface_hub's client factory, only while an int8 operation runs.

The end-to-end proofs (a server that never answers: convert, verify, push fail in seconds) are in
test_hub_download.py and test_push.py; these pin the mechanism: the library's own client settings
are kept, the shared session is not patched, and requests outside int8's operations are untouched.
"""

from __future__ import annotations

import threading
import time

import httpx2
import pytest
from huggingface_hub import constants, get_session, set_client_factory
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import _http

from int8.hub import timeouts
from int8.hub.timeouts import bound_request, bounded, current_bound

KEYS = ("connect", "read", "write", "pool")


def request(timeout: float | None = None) -> httpx2.Request:
    return httpx2.Client(timeout=timeout).build_request("GET", "http://127.0.0.1:9/x")


def timeouts_of(req: httpx2.Request) -> dict:
    return dict(req.extensions["timeout"])


@pytest.fixture
def default_factory():
    """Leave huggingface_hub with its default factory after the test (int8 wraps it again on its next operation)."""
    yield
    set_client_factory(_http.default_client_factory)


def test_the_hook_bounds_requests_only_inside_an_operation():
    unbounded, slow, quick = request(None), request(60.0), request(2.0)
    before = [timeouts_of(r) for r in (unbounded, slow, quick)]
    for r in (unbounded, slow, quick):
        bound_request(r)
    assert [timeouts_of(r) for r in (unbounded, slow, quick)] == before  # outside: nothing changes
    assert before[0] == dict.fromkeys(KEYS)
    with bounded(5.0):
        for r in (unbounded, slow, quick):
            bound_request(r)
    assert timeouts_of(unbounded) == dict.fromkeys(KEYS, 5.0)  # none: filled in
    assert timeouts_of(slow) == dict.fromkeys(KEYS, 5.0)  # longer: shortened
    assert timeouts_of(quick) == dict.fromkeys(KEYS, 2.0)  # shorter: kept
    assert current_bound() is None


def test_the_client_is_the_librarys_own_plus_one_hook(default_factory, monkeypatch):
    reference = _http.default_client_factory()
    with bounded(1.0):
        client = get_session()
    hooks = client.event_hooks["request"]
    assert hooks == [*reference.event_hooks["request"], bound_request]
    assert client.follow_redirects is reference.follow_redirects is True
    assert client.timeout == reference.timeout
    # the library's hook still does its work (offline mode blocks every request)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeIsEnabled):
        client.get("http://127.0.0.1:9/x")


def test_the_shared_session_is_not_patched_around_operations(default_factory):
    with bounded(1.0):
        client = get_session()
        during = list(client.event_hooks["request"])
    for _ in range(3):
        with bounded(0.5):
            assert get_session() is client
    assert list(client.event_hooks["request"]) == during and get_session() is client


def test_a_factory_the_user_set_is_kept(default_factory):
    set_client_factory(lambda: httpx2.Client(headers={"x-corp-proxy": "yes"}, follow_redirects=True))
    with bounded(1.0):
        client = get_session()
    assert client.headers["x-corp-proxy"] == "yes" and bound_request in client.event_hooks["request"]
    set_client_factory(lambda: httpx2.Client(headers={"x-later": "1"}))  # set after int8's: wrapped on the next operation
    with bounded(1.0):
        client = get_session()
    assert client.headers["x-later"] == "1" and client.event_hooks["request"] == [bound_request]


def test_each_operation_has_its_own_bound_and_worker_threads_get_the_running_ones():
    seen: dict[str, float | None] = {}
    started = threading.Barrier(3)

    def operation(name: str, timeout: float) -> None:
        with bounded(timeout):
            started.wait()
            seen[name] = current_bound()
            time.sleep(0.05)
            started.wait()

    threads = [threading.Thread(target=operation, args=(n, t)) for n, t in (("a", 1.0), ("b", 7.0))]
    for t in threads:
        t.start()
    started.wait()
    seen["worker"] = current_bound()  # this thread runs no operation: a client worker thread, say
    started.wait()
    for t in threads:
        t.join()
    assert seen == {"a": 1.0, "b": 7.0, "worker": 1.0}
    assert current_bound() is None and timeouts._ACTIVE == []

    with bounded(9.0):
        with bounded(2.0):
            assert current_bound() == 2.0
        assert current_bound() == 9.0
    assert current_bound() is None


def test_a_request_inside_an_operation_fails_in_bounded_time(hub_server, default_factory):
    with bounded(0.3):
        t0 = time.monotonic()
        with pytest.raises(httpx2.TimeoutException):
            get_session().get(hub_server.unresponsive_endpoint + "/api/whoami-v2")  # no timeout given: bounded anyway
    assert time.monotonic() - t0 < 5
