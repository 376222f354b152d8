"""One table of what the Hub client raises and the int8 error the user sees instead.

Each `Rule` of `rules()` matches an exception (by class, HTTP status or a
predicate) during one `Operation` (fetching a checkpoint, publishing one) and
says which `int8.errors.Int8Error` to raise, with a message and a hint written
as ``str.format`` templates over `Fields`. The first rule that matches wins, so
a subclass comes before its base (``GatedRepoError`` before
``RepositoryNotFoundError``; HTTP errors, which are ``OSError``, before the
network rules). An exception no rule matches is returned as it is: it is a bug
in int8 or in the client, and keeps its traceback.

Network failures are recognised by their classes: the HTTP client's transport
errors (``httpx2``, which huggingface_hub 2 uses, or ``httpx`` for 1.x: any
``TransportError``, of which ``TimeoutException`` is the timeouts), the
standard library's ``OSError`` (connection refused, DNS) and ``TimeoutError``.
Every message and hint leaves with URL credentials removed (`redact_error`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import cache

from ..errors import HubError, Int8Error, SourceNotFound, first_line
from .redact import endpoint as public_endpoint
from .redact import redact_error

NO_TOKEN = "no Hugging Face token: publishing needs one with write access"
TOKEN_HINT = "Set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens), or run `hf auth login`."
AGAIN = "Run the same command again: files the Hub already received are not sent again."
SERVED_OFFLINE = "A model downloaded before is served offline with HF_HUB_OFFLINE=1."


class Operation(Enum):
    """What int8 was doing with the Hub when the client raised."""

    FETCH = "fetching"
    PUBLISH = "publishing"


@dataclass(frozen=True)
class Fields:
    """What a rule's message and hint may name (``{repo_id}``, ``{revision!r}``, ...)."""

    repo_id: str
    revision: str | None
    create_pr: bool
    offline: bool
    endpoint: str
    owner: str  # the repo's namespace, or "your namespace"
    at: str  # " at revision 'v1'", or ""
    kind: str  # the exception's class name
    line: str  # the first line of its text (its class name when it has none)
    detail: str  # "kind: line", or "kind" when the text is empty
    cause: str  # the first line of the exception it was raised from, or ""
    env: str  # INT8_HUB_TIMEOUT


Predicate = Callable[[BaseException, Fields], bool]


@dataclass(frozen=True)
class Rule:
    """When ``when`` holds during one of ``ops``: raise ``error(message, hint)``, both formatted with `Fields`.

    With ``follow_cause`` the exception's cause is translated instead (a cache miss that a network
    failure caused says what the network did)."""

    ops: frozenset[Operation]
    when: Predicate
    error: type[Int8Error] = HubError
    message: str = ""
    hint: str | None = None
    follow_cause: bool = False


FETCH = frozenset({Operation.FETCH})
PUBLISH = frozenset({Operation.PUBLISH})
BOTH = FETCH | PUBLISH


@cache
def transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(network errors, timeouts) as classes: the HTTP clients' transport errors and the standard library's."""
    network: list[type[BaseException]] = [OSError, TimeoutError]
    timeouts: list[type[BaseException]] = [TimeoutError]
    for name in ("httpx2", "httpx"):  # huggingface_hub 2.x, 1.x
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        network.append(module.TransportError)
        timeouts.append(module.TimeoutException)
    return tuple(network), tuple(timeouts)


def is_network_error(e: BaseException) -> bool:
    """Connection refused, DNS failure, reset, timeout: the transport failed, not the Hub."""
    return isinstance(e, transport_errors()[0])


def is_timeout(e: BaseException) -> bool:
    return isinstance(e, transport_errors()[1])


def _is(*classes: type[BaseException] | None) -> Predicate:
    found = tuple(c for c in classes if c is not None)
    return lambda e, f: isinstance(e, found)


def _status(http_error: type[BaseException], code: int) -> Predicate:
    return lambda e, f: isinstance(e, http_error) and getattr(getattr(e, "response", None), "status_code", None) == code


def _both(a: Predicate, b: Predicate) -> Predicate:
    return lambda e, f: a(e, f) and b(e, f)


def _cause(e: BaseException) -> BaseException | None:
    return e.__cause__ or e.__context__


def _offline(e: BaseException, f: Fields) -> bool:
    return f.offline


def _creating_pr(e: BaseException, f: Fields) -> bool:
    return f.create_pr


def _network_cause(e: BaseException, f: Fields) -> bool:
    cause = _cause(e)
    return cause is not None and is_network_error(cause)


def _lfs_transfer_failed(e: BaseException, f: Fields) -> bool:
    """The commit's LFS step re-raises a failed transfer as RuntimeError("Error while uploading ...") from it."""
    return isinstance(e, RuntimeError) and _cause(e) is not None and "uploading" in str(e)


@cache
def rules() -> tuple[Rule, ...]:
    """The table, in the order it is consulted (built on first use: huggingface_hub is imported lazily)."""
    from huggingface_hub import errors as hf

    cache_miss = _is(hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, getattr(hf, "CachedRepoTreeNotFoundError", None))
    http, timeout, network = hf.HfHubHTTPError, lambda e, f: is_timeout(e), lambda e, f: is_network_error(e)
    return (
        # fetching a checkpoint (int8 convert, int8 verify --against)
        Rule(FETCH, _is(hf.RevisionNotFoundError), SourceNotFound,
             "revision {revision!r} does not exist in {repo_id}", "Use a branch name, a tag or a full commit hash."),
        Rule(FETCH, _is(hf.GatedRepoError), HubError,
             "{repo_id} is gated: accept its terms on the Hub with your account, then retry with HF_TOKEN set"),
        Rule(FETCH, _is(hf.RepositoryNotFoundError), SourceNotFound,
             "{repo_id!r} is not a preset, a local folder, or a model repo on {endpoint}",
             "Check the spelling (`int8 presets` lists presets). If the repo is private, set HF_TOKEN or run `hf auth login`."),
        Rule(FETCH, _both(cache_miss, _offline), HubError,
             "{repo_id}{at} is not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading it",
             "Run once with the network (HF_HUB_OFFLINE unset) to fill the cache."),
        Rule(FETCH, _both(cache_miss, _network_cause), follow_cause=True),
        Rule(FETCH, cache_miss, HubError,
             "{repo_id} is not in the local cache and the Hub cannot be reached ({endpoint})",
             "Check the network (and HF_ENDPOINT), then retry."),
        Rule(FETCH, _status(http, 401), HubError, "the Hub rejected the token (401) while fetching {repo_id}",
             "Check HF_TOKEN (or `hf auth login`): the token is invalid or expired."),
        Rule(FETCH, _status(http, 403), HubError, "access to {repo_id} was refused (403)", "Your token lacks read access to this repo."),
        Rule(FETCH, _is(http), HubError, "the Hub answered an error for {repo_id}: {line}"),
        Rule(FETCH, timeout, HubError, "the Hub at {endpoint} did not answer in time ({kind}) while fetching {repo_id}",
             "Check the network (and HF_ENDPOINT). {env}=SECONDS waits longer. " + SERVED_OFFLINE),
        Rule(FETCH, network, HubError, "cannot reach the Hub at {endpoint} ({detail})",
             "Check the network (and HF_ENDPOINT). " + SERVED_OFFLINE),
        # publishing one (int8 push, int8 convert --push)
        Rule(PUBLISH, _is(hf.LocalTokenNotFoundError), HubError, NO_TOKEN, TOKEN_HINT),
        Rule(PUBLISH, _is(hf.HFValidationError), HubError, "{repo_id!r} is not a valid Hub repo id ({line})",
             "Use OWNER/NAME (or NAME for your own namespace): letters, digits, '-', '_' and '.'."),
        Rule(PUBLISH, _is(hf.RevisionNotFoundError), HubError,
             "branch {revision!r} does not exist in {repo_id}", "Open the PR against an existing branch."),
        Rule(PUBLISH, _both(_is(hf.RepositoryNotFoundError), _creating_pr), HubError,
             "{repo_id} does not exist (or is private): a pull request needs an existing repo", "Push without --create-pr to create it."),
        Rule(PUBLISH, _is(hf.RepositoryNotFoundError), HubError,
             "{repo_id} was not found on {endpoint}", "Check the repo id and that the token can see it."),
        Rule(PUBLISH, _status(http, 401), HubError, "the Hub rejected the token (401) while publishing to {repo_id}",
             "The token is invalid or expired. " + TOKEN_HINT),
        Rule(PUBLISH, _status(http, 403), HubError, "the token has no write access to {owner!r} (403): cannot publish to {repo_id}",
             "Use a token with write access to that namespace (a fine-grained or read token is not enough), "
             "publish under your own namespace, or open a pull request with --create-pr."),
        Rule(PUBLISH, _is(http), HubError, "the Hub refused the upload to {repo_id}: {line}", AGAIN),
        Rule(PUBLISH, _lfs_transfer_failed, HubError, "the upload to {repo_id} was interrupted ({line} {cause})", AGAIN),
        Rule(PUBLISH, timeout, HubError, "the Hub at {endpoint} did not answer in time while publishing to {repo_id}",
             "Check the network (and HF_ENDPOINT); {env}=SECONDS waits longer. " + AGAIN),
        Rule(PUBLISH, network, HubError, "cannot reach the Hub at {endpoint} ({detail})", "Check the network (and HF_ENDPOINT). " + AGAIN),
    )


def fields(e: BaseException, repo_id: str, revision: str | None = None, create_pr: bool = False) -> Fields:
    from huggingface_hub import constants

    from .timeouts import ENV

    line = first_line(e)
    cause = _cause(e)
    return Fields(
        repo_id=repo_id,
        revision=revision,
        create_pr=create_pr,
        offline=bool(constants.HF_HUB_OFFLINE),
        endpoint=public_endpoint(),
        owner=repo_id.split("/")[0] if "/" in repo_id else "your namespace",
        at=f" at revision {revision!r}" if revision else "",
        kind=type(e).__name__,
        line=line,
        detail=f"{type(e).__name__}: {line}" if str(e).strip() else type(e).__name__,
        cause=first_line(cause) if cause is not None else "",
        env=ENV,
    )


def translate(
    e: BaseException, operation: Operation, repo_id: str, *, revision: str | None = None, create_pr: bool = False
) -> BaseException:
    """The int8 error to raise for ``e``, raised by the client while ``operation`` ran on ``repo_id``
    (URL credentials removed); ``e`` itself when it is already an int8 error or no rule matches."""
    if isinstance(e, Int8Error):
        return redact_error(e)
    f = fields(e, repo_id, revision, create_pr)
    for rule in rules():
        if operation in rule.ops and rule.when(e, f):
            if rule.follow_cause:
                return translate(_cause(e), operation, repo_id, revision=revision, create_pr=create_pr)
            hint = rule.hint.format_map(vars(f)) if rule.hint else None
            return redact_error(rule.error(rule.message.format_map(vars(f)), hint))
    return e
