"""The table of Hub error mappings (int8.hub.errors): what the client raises, what the user reads instead.

Exceptions are built here as huggingface_hub and its HTTP client raise them (real classes, real
responses); the end-to-end paths (a real client against the test Hub) are in test_hub_download.py
and test_push.py.
"""

from __future__ import annotations

import dataclasses
import socket

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub import errors as hf

from int8.errors import HubError, Int8Error, SourceNotFound, first_line
from int8.hub.errors import Fields, Operation, is_network_error, is_timeout, rules, translate

FETCH, PUBLISH = Operation.FETCH, Operation.PUBLISH
URL = "https://hub.test/api/models/alice/tiny"


def http_error(cls: type[hf.HfHubHTTPError], status: int, text: str = "boom") -> hf.HfHubHTTPError:
    response = httpx2.Response(status, request=httpx2.Request("GET", URL))
    return cls(f"{status} Client Error: {text} for url: {URL}\nmore details", response=response)


def raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as c:
            raise outer from c
    except BaseException as e:
        return e


@pytest.fixture(autouse=True)
def endpoint(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.test")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


CASES = [
    # (operation, exception, int8 class, message fragment, hint fragment)
    (FETCH, http_error(hf.RevisionNotFoundError, 404), SourceNotFound, "revision 'v9' does not exist in alice/tiny", "full commit hash"),
    (FETCH, http_error(hf.GatedRepoError, 401), HubError, "alice/tiny is gated", None),
    (FETCH, http_error(hf.RepositoryNotFoundError, 404), SourceNotFound,
     "'alice/tiny' is not a preset, a local folder, or a model repo on https://hub.test", "set HF_TOKEN"),
    (FETCH, hf.LocalEntryNotFoundError("nothing"), HubError,
     "alice/tiny is not in the local cache and the Hub cannot be reached (https://hub.test)", "then retry"),
    (FETCH, http_error(hf.HfHubHTTPError, 401), HubError, "rejected the token (401) while fetching alice/tiny", "invalid or expired"),
    (FETCH, http_error(hf.HfHubHTTPError, 403), HubError, "access to alice/tiny was refused (403)", "lacks read access"),
    (FETCH, http_error(hf.HfHubHTTPError, 500, "oops"), HubError,
     "the Hub answered an error for alice/tiny: 500 Client Error: oops for url", None),
    (FETCH, httpx2.ReadTimeout("timed out"), HubError,
     "the Hub at https://hub.test did not answer in time (ReadTimeout) while fetching alice/tiny", "INT8_HUB_TIMEOUT=SECONDS"),
    (FETCH, TimeoutError("slow"), HubError, "did not answer in time (TimeoutError)", "HF_HUB_OFFLINE=1"),
    (FETCH, httpx2.ConnectError("[Errno 111] Connection refused"), HubError,
     "cannot reach the Hub at https://hub.test (ConnectError: [Errno 111] Connection refused)", "HF_HUB_OFFLINE=1"),
    (FETCH, httpx2.ConnectError(""), HubError, "cannot reach the Hub at https://hub.test (ConnectError)", None),  # no text: the class
    (FETCH, socket.gaierror(-2, "Name or service not known"), HubError, "cannot reach the Hub at https://hub.test (gaierror: ", None),
    (FETCH, raised_from(hf.LocalEntryNotFoundError("cannot find"), httpx2.ConnectTimeout("connect")), HubError,
     "did not answer in time (ConnectTimeout) while fetching", None),
    (FETCH, raised_from(hf.LocalEntryNotFoundError("cannot find"), httpx2.ConnectError("refused")), HubError,
     "cannot reach the Hub at https://hub.test (ConnectError: refused)", None),
    (PUBLISH, hf.LocalTokenNotFoundError("no token"), HubError, "no Hugging Face token", "write access"),
    (PUBLISH, hf.HFValidationError("Repo id must use alphanumeric chars\nsecond line"), HubError,
     "'alice/tiny' is not a valid Hub repo id (Repo id must use alphanumeric chars)", None),
    (PUBLISH, http_error(hf.RevisionNotFoundError, 404), HubError, "branch 'v9' does not exist in alice/tiny", "existing branch"),
    (PUBLISH, http_error(hf.RepositoryNotFoundError, 404), HubError, "alice/tiny was not found on https://hub.test", "repo id"),
    (PUBLISH, http_error(hf.HfHubHTTPError, 401), HubError, "rejected the token (401) while publishing to alice/tiny", "HF_TOKEN"),
    (PUBLISH, http_error(hf.HfHubHTTPError, 403), HubError, "no write access to 'alice' (403): cannot publish to alice/tiny",
     "--create-pr"),
    (PUBLISH, http_error(hf.HfHubHTTPError, 413, "too large"), HubError, "the Hub refused the upload to alice/tiny: 413",
     "Run the same command again"),
    (PUBLISH, raised_from(RuntimeError("Error while uploading 'x.safetensors' to the Hub."), httpx2.ReadError("reset")), HubError,
     "the upload to alice/tiny was interrupted (Error while uploading 'x.safetensors' to the Hub. reset)", "not sent again"),
    (PUBLISH, httpx2.WriteTimeout(""), HubError, "did not answer in time while publishing to alice/tiny", "INT8_HUB_TIMEOUT"),
    (PUBLISH, httpx2.RemoteProtocolError("peer closed"), HubError, "cannot reach the Hub at https://hub.test (RemoteProtocolError: peer",
     "not sent again"),
    (PUBLISH, ConnectionResetError(104, "Connection reset by peer"), HubError, "(ConnectionResetError: [Errno 104]", None),
]


@pytest.mark.parametrize(("op", "exc", "cls", "message", "hint"), CASES, ids=[f"{c[0].name}-{type(c[1]).__name__}-{i}" for i, c in
                                                                              enumerate(CASES)])
def test_each_rule_says_what_happened_and_what_to_do(op, exc, cls, message, hint):
    err = translate(exc, op, "alice/tiny", revision="v9")
    assert type(err) is cls, err
    assert message in err.message, err.message
    if hint is None:
        assert err.hint is None or err.hint.strip()
    else:
        assert err.hint and hint in err.hint, err.hint
    assert "\n" not in err.message  # the first line of the client's text only


def test_a_pull_request_needs_an_existing_repo():
    err = translate(http_error(hf.RepositoryNotFoundError, 404), PUBLISH, "alice/tiny", create_pr=True)
    assert "a pull request needs an existing repo" in err.message and "without --create-pr" in err.hint


@pytest.mark.parametrize("exc", [hf.LocalEntryNotFoundError("x"), hf.OfflineModeIsEnabled("offline"),
                                 hf.CachedRepoTreeNotFoundError("no tree")])
def test_offline_cache_misses_name_the_revision(exc, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    err = translate(exc, FETCH, "alice/tiny", revision="v1")
    assert err.message == "alice/tiny at revision 'v1' is not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    assert translate(exc, FETCH, "alice/tiny").message.startswith("alice/tiny is not in the local cache, and")


def test_the_wording_follows_the_operation():
    for exc in (httpx2.ReadTimeout("t"), http_error(hf.HfHubHTTPError, 401)):
        fetching, publishing = translate(exc, FETCH, "alice/tiny"), translate(exc, PUBLISH, "alice/tiny")
        assert "fetching" in fetching.message and "publishing" in publishing.message
    # what only one operation can meet is left alone by the other
    token = hf.LocalTokenNotFoundError("no token")
    assert "no Hugging Face token" not in str(translate(token, FETCH, "alice/tiny"))


class TransportError(Exception):
    """Named like the client's class, unrelated to it."""


class TimeoutException(Exception):
    pass


class SlowProxy(httpx2.TimeoutException):
    """A client subclass with a name the old name-matching did not know."""


def test_network_errors_are_recognised_by_class_not_by_name():
    assert not is_network_error(TransportError("x")) and not is_timeout(TimeoutException("x"))
    for lookalike in (TransportError("x"), TimeoutException("x"), ValueError("connect")):
        assert translate(lookalike, FETCH, "alice/tiny") is lookalike  # not ours to explain: kept with its traceback
    assert is_timeout(SlowProxy("x")) and is_network_error(SlowProxy("x"))
    assert is_network_error(httpx2.ProxyError("x")) and not is_timeout(httpx2.ConnectError("x"))
    assert is_network_error(ConnectionRefusedError()) and is_timeout(socket.timeout())
    assert "did not answer in time (SlowProxy)" in translate(SlowProxy("x"), FETCH, "alice/tiny").message


def test_int8_errors_pass_through_and_unknown_errors_are_kept():
    own = Int8Error("already explained", "hint")
    assert translate(own, PUBLISH, "alice/tiny") is own
    bug = KeyError("a bug")
    assert translate(bug, FETCH, "alice/tiny") is bug and translate(bug, PUBLISH, "alice/tiny") is bug


@pytest.mark.parametrize("op", list(Operation))
def test_credentials_in_the_endpoint_or_the_clients_text_never_show(op, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "https://user:s3cret@hub.test")
    leaky = [
        httpx2.ConnectError("failed to reach https://bob:s3cret@hub.test/api"),
        http_error(hf.HfHubHTTPError, 500, "at https://x:s3cret@hub.test/"),
        http_error(hf.RepositoryNotFoundError, 404),
        raised_from(RuntimeError("Error while uploading to https://u:s3cret@lfs.test/"), httpx2.ReadError("https://u:s3cret@lfs.test")),
        Int8Error("at https://u:s3cret@hub.test", "see https://u:s3cret@hub.test/x"),
    ]
    for exc in leaky:
        err = translate(exc, op, "alice/tiny")
        if isinstance(err, Int8Error):
            assert "s3cret" not in str(err) and "s3cret" not in (err.hint or ""), str(err)
            assert "s3cret" not in err.args[0]


def test_every_template_names_only_known_fields():
    f = Fields(**{k.name: "x" for k in dataclasses.fields(Fields)})
    for rule in rules():
        assert rule.ops, rule
        if rule.follow_cause:
            continue
        rule.message.format_map(vars(f))
        if rule.hint:
            rule.hint.format_map(vars(f))
        assert rule.message and issubclass(rule.error, Int8Error)


def test_subclasses_come_before_their_bases():
    """A rule shadowed by an earlier, broader one for the same operation would never apply."""
    samples = {
        hf.GatedRepoError: http_error(hf.GatedRepoError, 401),
        hf.RevisionNotFoundError: http_error(hf.RevisionNotFoundError, 404),
    }
    assert "gated" in translate(samples[hf.GatedRepoError], FETCH, "a/b").message
    assert "does not exist" in translate(samples[hf.RevisionNotFoundError], PUBLISH, "a/b").message
    assert "gated" not in translate(http_error(hf.RepositoryNotFoundError, 404), FETCH, "a/b").message


def test_first_line():
    assert first_line(ValueError("  one\ntwo")) == "one" and first_line(ValueError("")) == "ValueError"
    assert first_line(ValueError("x" * 500), limit=10) == "x" * 10
