"""A Hugging Face Hub stand-in for tests: a small HTTP server on 127.0.0.1 that speaks
the subset of the Hub API the real ``huggingface_hub`` client (2.4, plain LFS path,
``HF_HUB_DISABLE_XET=1``) uses to download and upload.

Standard library only. Repos live in memory: each has branches (``main``), tags,
pull-request refs (``refs/pr/N``), commits (40-hex ids) with a full file tree per
commit (content, git blob sha, LFS sha256), a private/gated flag and an owner namespace.

Fixtures
--------
``hub``
    Function scoped. Starts a fresh :class:`HubServer` on an ephemeral port and points
    the in-process ``huggingface_hub`` at it, with a fresh ``HF_HOME`` (cache, token
    file) under the test's ``tmp_path``. Yields the server. ``HF_TOKEN`` is not set:
    pass ``token=hub.tokens.alice`` to client calls, or call ``hub.login("alice")``.

``hub_server``
    Same server, but the in-process client is *not* patched (for tests that only drive
    subprocesses, or that want to patch themselves with ``hub.patch_client``).

``fast_retries``
    Makes huggingface_hub's retry sleeps instant in-process (``.sleeps`` lists them).

Outside pytest: ``with HubServer() as hub: ...`` (starts and stops it).

The server object
-----------------
``hub.endpoint``         ``"http://127.0.0.1:<port>"``
``hub.tokens``           ``.alice`` (write; member of org ``int8-org``), ``.alice_read``
                         (read-only token of alice), ``.bob`` (write), ``.invalid``
                         (unknown token -> 401). ``hub.add_user(name, orgs=(), role=...)``
                         makes more.
``hub.create_repo(repo_id, files={path: bytes|str|Path}, private=False, gated=False,
                  repo_type="model", lfs=None, gitattributes=False)``
                         seeds a repo directly (no HTTP). ``hub.commit(...)``,
                         ``hub.create_branch(...)``, ``hub.create_tag(...)`` add history;
                         ``hub.files(repo_id, rev)`` / ``hub.file_bytes(...)`` read back;
                         ``hub.blob(repo_id, path, rev)`` is the stored :class:`Blob`
                         (``.lfs``, ``.sha256``, ``.git_oid``); ``hub.repo(repo_id,
                         repo_type)`` is the :class:`Repo` (``.branches``, ``.tags``,
                         ``.pr_heads`` {"refs/pr/N": oid}, ``.pull_requests``,
                         ``.commits``, ``.private``, ``.gated``, ``.granted``).
                         A repo made over HTTP gets an initial commit holding the
                         Hub's default ``.gitattributes``, like the real Hub.
``hub.log``              :class:`RequestLog` of every request: ``.records`` (each a
                         :class:`RequestRecord`: method, path, query, status, kind,
                         repo_id, revision, filename, oid, auth_sent, user,
                         request_bytes, response_bytes, range, dropped, headers),
                         ``.filter(where=None, ok=None, **attrs)``, ``.count(...)``,
                         ``.downloads(filename)`` (GET /resolve, 2xx),
                         ``.downloaded_files()``, ``.lfs_uploads(oid, completed)``,
                         ``.summary()``, ``.clear()``. Records are appended before
                         the response body goes out. ``kind`` is one of: whoami, agent-harnesses, create-repo,
                         delete-repo, validate-yaml, repo-info, tree, paths-info, refs,
                         commits, preupload, commit, branch, tag, settings, auth-check,
                         resolve, lfs-batch, lfs-verify, lfs-upload, lfs-upload-part,
                         lfs-complete, unknown.
``hub.faults``           :class:`Faults`: ``drop_lfs_upload(times=1, oid=None)`` (read
                         half the body, then reset the connection), ``fail_lfs_upload(
                         status=..., times=1, oid=None)``, ``drop_download(times=1,
                         filename=None, reset=False)`` (send half the body, then
                         close: the client resumes with ``Range``),
                         ``fail(kind, status, times=1)``, ``hang(kind=None)`` (matching
                         requests get no answer until ``release()``/``clear()``).
``hub.unresponsive_endpoint``  a second port that accepts TCP connections and never
                         answers ("server does not answer" tests).
``hub.stop()``           stop serving (the port then refuses connections).
``hub.env(user=None, token=None, hf_home=None, offline=False, **extra)``
                         (``user`` is a ``hub.tokens`` name: "alice", "bob",
                         "alice_read", "invalid")
                         full environment dict for a subprocess: ``HF_ENDPOINT``,
                         ``HF_TOKEN`` (when ``user``/``token`` given, else removed), a
                         fresh ``HF_HOME`` (unless given), ``HF_HUB_DISABLE_XET=1``,
                         ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_OFFLINE=1`` if
                         ``offline``; ``extra`` values are added (``None`` removes a key).
``hub.lfs_size_threshold`` (bytes, default 10 MiB), ``hub.lfs_patterns``: what the
                         preupload answer marks ``"lfs"`` (binary files are LFS too).
``hub.lfs_multipart_chunk_size``: set to an int to make the LFS batch answer ask for a
                         multipart upload of objects larger than that.
``hub.tree_page_size``   tree listing page size (pagination through ``Link`` headers).
``hub.login(name_or_token)`` / ``hub.offline()``  set ``HF_TOKEN`` / ``HF_HUB_OFFLINE``
                         for the in-process client, for the current test only.

In-process use
--------------
``huggingface_hub`` copies ``HF_ENDPOINT`` and ``HF_HOME`` into module globals at
import time, so :meth:`HubServer.patch_client` (done by the ``hub`` fixture) rewrites:
``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (used by
``hf_hub_url``), ``constants.HF_URL_HOSTS``, ``hf_api.api.endpoint`` (the module-level
``HfApi`` behind ``huggingface_hub.create_repo``/``upload_folder``/``model_info``...),
``utils._http._HUB_ORIGINS``, the cache/token paths in ``constants`` (and
``utils._cache_manager.HF_HUB_CACHE``), and sets the ``HF_ENDPOINT``/``HF_HOME``
environment variables so subprocesses inherit them. After that ``snapshot_download``,
``hf_hub_download``, ``HfApi()`` and the module-level helpers all talk to the server
without an ``endpoint=`` argument. ``hub.offline()`` flips
``constants.HF_HUB_OFFLINE`` for the test. Note: ``HfApi`` objects created *before* the
patch keep their old endpoint.

Client facts this server relies on (huggingface_hub 2.4):

* The LFS upload URL is called without an Authorization header; multipart parts and the
  completion POST too. The server issues an unguessable per-object URL instead.
* ``http_backoff`` retries dropped connections / 408, 429, 5xx five times with 1+2+4+8+8 s
  sleeps; a test that wants an upload to *fail* must make every attempt fail
  (``drop_lfs_upload(times=None)``) and should patch the sleeps (``fast_retries``
  fixture) to stay fast. In a subprocess the sleeps cannot be patched: use
  ``fail_lfs_upload(status=400, times=None, oid=...)``, which the client does not retry.
* Downloads resume (``Range: bytes=N-``) only after a clean close mid-body, and only from
  the last whole ``DOWNLOAD_CHUNK_SIZE`` (10 MB) chunk; a TCP reset (``httpx2.ReadError``)
  is not retried at all.
* Against a server that accepts connections and never answers: ``hf_hub_download`` with
  nothing cached retries the HEAD with a hard-coded 60 s timeout and five retries (minutes,
  whatever ``HF_HUB_ETAG_TIMEOUT`` says); ``HfApi.model_info``/``repo_info`` (and thus
  ``snapshot_download``) send ``timeout=None`` explicitly, i.e. wait forever, and a client
  factory with a default timeout does not change that. Only an explicit ``timeout=`` bounds
  them. Against a refused port ``snapshot_download`` fails at once and ``hf_hub_download``
  after its retries (~23 s of sleeps).
* 401 without ``X-Error-Code`` is only mapped to ``RepositoryNotFoundError`` for https
  URLs, so the server always sends ``X-Error-Code: RepoNotFound`` for hidden repos.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

try:  # PyYAML ships with transformers' dependencies; the card validator needs it
    import yaml
except ImportError:  # pragma: no cover - fallback documented in validate_card_metadata
    yaml = None


# --------------------------------------------------------------------------- constants

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
WEB_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# The .gitattributes the Hub writes into a new repo (initial commit).
DEFAULT_GITATTRIBUTES_PATTERNS = [
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
    "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
    "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
    "*.zst", "*tfevents*",
]
DEFAULT_GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in DEFAULT_GITATTRIBUTES_PATTERNS
).encode()

# Hub license ids (https://huggingface.co/docs/hub/repositories-licenses).
KNOWN_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear
    c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0
    cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0
    cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl
    ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
    lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0
    odc-by odbl openmdw-1.0 openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr
    deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2
    llama3.3 llama4 gemma grok2-community unknown other""".split()
)

# Hub task ids (pipeline_tag).
KNOWN_PIPELINE_TAGS = frozenset(
    """text-classification token-classification table-question-answering question-answering
    zero-shot-classification translation summarization feature-extraction text-generation
    text2text-generation fill-mask sentence-similarity text-to-speech text-to-audio
    automatic-speech-recognition audio-to-audio audio-classification audio-text-to-text
    voice-activity-detection depth-estimation image-classification object-detection
    image-segmentation text-to-image image-to-text image-to-image image-to-video
    unconditional-image-generation video-classification reinforcement-learning robotics
    tabular-classification tabular-regression tabular-to-text table-to-text multiple-choice
    text-ranking text-retrieval time-series-forecasting text-to-video image-text-to-text
    visual-question-answering document-question-answering zero-shot-image-classification
    graph-ml mask-generation zero-shot-object-detection text-to-3d image-to-3d
    image-feature-extraction video-text-to-text keypoint-detection visual-document-retrieval
    any-to-any video-to-video other""".split()
)
BASE_MODEL_RELATIONS = frozenset({"adapter", "merge", "quantized", "finetune"})

_LANG_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_YAML_BLOCK_RE = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_PR_RE = re.compile(r"^refs/pr/(\d+)$")

API_SUBPATHS = frozenset(
    "revision tree paths-info refs commits preupload commit branch tag settings auth-check "
    "discussions resolve".split()
)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def git_blob_sha(data: bytes) -> str:
    """Git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Blob:
    """A file in a commit's tree."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str  # git sha1 of the content (regular) or of the LFS pointer file (lfs)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid

    @property
    def local_oid(self) -> str:
        """What the client compares against: sha256 for LFS files, git sha1 otherwise."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    oid: str
    parents: list[str]
    tree: dict[str, Blob]
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class PullRequest:
    num: int
    ref: str
    base: str
    author: str
    title: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    gated: Any = False  # False, "auto" or "manual"
    granted: set = field(default_factory=set)  # users granted access to a gated repo
    branches: dict = field(default_factory=dict)  # name -> commit oid
    tags: dict = field(default_factory=dict)  # name -> commit oid
    pull_requests: dict = field(default_factory=dict)  # num -> PullRequest
    pr_heads: dict = field(default_factory=dict)  # "refs/pr/N" -> commit oid
    commits: dict = field(default_factory=dict)  # oid -> Commit
    lfs_objects: set = field(default_factory=set)  # sha256 of objects uploaded to this repo
    created_at: datetime = field(default_factory=_now)
    next_discussion: int = 1

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0] if "/" in self.repo_id else ""

    def resolve(self, rev: str) -> str | None:
        """Commit oid for a branch, tag, ``refs/heads/x``, ``refs/tags/x``, ``refs/pr/N`` or full sha."""
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if rev.startswith("refs/heads/") and rev[11:] in self.branches:
            return self.branches[rev[11:]]
        if rev.startswith("refs/tags/") and rev[10:] in self.tags:
            return self.tags[rev[10:]]
        if rev in self.pr_heads:
            return self.pr_heads[rev]
        if _SHA_RE.match(rev) and rev in self.commits:
            return rev
        return None

    def head(self, rev: str = "main") -> Commit:
        oid = self.resolve(rev)
        if oid is None:
            raise KeyError(f"unknown revision {rev!r} in {self.repo_id}")
        return self.commits[oid]


@dataclass
class User:
    name: str
    orgs: tuple = ()

    @property
    def namespaces(self) -> set:
        return {self.name, *self.orgs}


@dataclass
class Token:
    value: str
    user: User
    role: str  # "write" or "read"


@dataclass
class RequestRecord:
    method: str
    path: str  # decoded path, no query
    raw_path: str
    query: dict
    kind: str = "unknown"
    status: int = 0
    repo_id: str | None = None
    repo_type: str | None = None
    revision: str | None = None
    filename: str | None = None
    oid: str | None = None
    auth_sent: bool = False
    user: str | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    range: str | None = None
    dropped: bool = False
    headers: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)


class RequestLog:
    """Thread-safe list of :class:`RequestRecord`.

    A record is appended before the response body is written, so once a client call
    returns, every request it made is in the log.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[RequestRecord] = []

    def append(self, record: RequestRecord) -> None:
        with self._lock:
            self.records.append(record)

    def clear(self) -> None:
        with self._lock:
            self.records.clear()

    def filter(self, where: Callable[[RequestRecord], bool] | None = None, **criteria) -> list[RequestRecord]:
        """Records whose attributes equal every ``criteria`` value (and satisfy ``where``).

        ``ok=True`` keeps 2xx answers only.
        """
        ok = criteria.pop("ok", None)
        with self._lock:
            records = list(self.records)
        out = []
        for r in records:
            if any(getattr(r, k) != v for k, v in criteria.items()):
                continue
            if ok is not None and (200 <= r.status < 300) != ok:
                continue
            if where is not None and not where(r):
                continue
            out.append(r)
        return out

    def count(self, where: Callable[[RequestRecord], bool] | None = None, **criteria) -> int:
        return len(self.filter(where, **criteria))

    def downloads(self, filename: str | None = None, repo_id: str | None = None) -> list[RequestRecord]:
        """Successful ``GET .../resolve/...`` requests (file bodies sent)."""
        crit = {"kind": "resolve", "method": "GET", "ok": True}
        if filename is not None:
            crit["filename"] = filename
        if repo_id is not None:
            crit["repo_id"] = repo_id
        return self.filter(**crit)

    def downloaded_files(self) -> set:
        return {r.filename for r in self.downloads()}

    def lfs_uploads(self, oid: str | None = None, completed: bool | None = None) -> list[RequestRecord]:
        """LFS object upload requests (basic PUTs and multipart parts), dropped ones included."""
        out = [r for r in self.filter(where=lambda r: r.kind in ("lfs-upload", "lfs-upload-part"))]
        if oid is not None:
            out = [r for r in out if r.oid == oid]
        if completed is not None:
            out = [r for r in out if (r.status == 200 and not r.dropped) == completed]
        return out

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(list(self.records))

    def summary(self) -> str:
        """One line per request, for assertion messages."""
        return "\n".join(
            f"{r.method} {r.path} -> {r.status}{' (dropped)' if r.dropped else ''} [{r.kind}]" for r in self
        )


@dataclass
class _Fault:
    action: str  # "drop", "status", "hang"
    kinds: tuple
    times: int | None
    status: int = 500
    oid: str | None = None
    filename: str | None = None
    repo_id: str | None = None
    fraction: float = 0.5
    reset: bool = True
    hits: int = 0


class Faults:
    """Fault injection. Each fault fires for the next ``times`` matching requests
    (``times=None``: until :meth:`clear`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._released = threading.Event()
        self._released.set()

    def _add(self, fault: _Fault) -> _Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def drop_lfs_upload(self, times: int | None = 1, oid: str | None = None, fraction: float = 0.5) -> _Fault:
        """Read ``fraction`` of the next LFS upload body (PUT or multipart part), then reset the connection."""
        return self._add(_Fault("drop", ("lfs-upload", "lfs-upload-part"), times, oid=oid, fraction=fraction))

    def fail_lfs_upload(self, status: int = 500, times: int | None = 1, oid: str | None = None) -> _Fault:
        """Answer the next LFS upload with ``status`` (after reading the body)."""
        return self._add(_Fault("status", ("lfs-upload", "lfs-upload-part"), times, status=status, oid=oid))

    def drop_download(self, times: int | None = 1, filename: str | None = None, fraction: float = 0.5,
                      reset: bool = False) -> _Fault:
        """Send the headers and ``fraction`` of the next file GET body, then close the connection.

        ``reset=False`` (default) closes cleanly: the client sees an incomplete body
        (``RemoteProtocolError``) and resumes with a ``Range`` request. ``reset=True`` sends a
        TCP reset instead: the client gets ``httpx2.ReadError``, which ``hf_hub_download``
        does *not* retry."""
        return self._add(_Fault("drop", ("resolve",), times, filename=filename, fraction=fraction, reset=reset))

    def fail(self, kind: str | Iterable[str], status: int = 500, times: int | None = 1, **match) -> _Fault:
        """Answer the next request(s) of ``kind`` with ``status`` (body read first)."""
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        return self._add(_Fault("status", kinds, times, status=status, **match))

    def hang(self, kind: str | Iterable[str] | None = None, times: int | None = None) -> _Fault:
        """Matching requests (all if ``kind`` is None) get no answer until :meth:`release`."""
        kinds = () if kind is None else ((kind,) if isinstance(kind, str) else tuple(kind))
        self._released.clear()
        return self._add(_Fault("hang", kinds, times))

    def release(self) -> None:
        with self._lock:
            self._faults = [f for f in self._faults if f.action != "hang"]
        self._released.set()

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
        self._released.set()

    def take(self, kind: str, method: str, actions: tuple, oid=None, filename=None, repo_id=None) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.action not in actions:
                    continue
                if f.kinds and kind not in f.kinds:
                    continue
                if f.action == "drop" and kind == "resolve" and method != "GET":
                    continue
                if f.oid is not None and f.oid != oid:
                    continue
                if f.filename is not None and f.filename != filename:
                    continue
                if f.repo_id is not None and f.repo_id != repo_id:
                    continue
                f.hits += 1
                if f.times is not None:
                    f.times -= 1
                    if f.times <= 0:
                        self._faults.remove(f)
                return f
        return None

    def wait_released(self, timeout: float) -> None:
        self._released.wait(timeout)


class HubError(Exception):
    """Raised inside handlers; turned into an error response."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, body=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


class _Dropped(Exception):
    """The handler reset the connection on purpose."""


# --------------------------------------------------------------------------- card metadata


def split_card(content: str) -> tuple[str | None, str]:
    """(yaml text or None, body) of a README.md."""
    m = _YAML_BLOCK_RE.search(content)
    if m is None:
        return None, content
    return m.group(2), content[m.end():]


def validate_card_metadata(content: str, repo_type: str = "model") -> tuple[list[str], list[str]]:
    """Check a model card's YAML header roughly like the Hub does. Returns (errors, warnings)."""
    errors: list[str] = []
    warnings: list[str] = []
    text, _ = split_card(content)
    if text is None or not text.strip():
        warnings.append("empty or missing yaml metadata in repo card")
        return errors, warnings
    if yaml is None:  # pragma: no cover
        return ["PyYAML is not installed on the test machine: cannot parse the card metadata"], warnings
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"Error parsing YAML metadata: {str(e).splitlines()[0]}"], warnings
    if data is None:
        warnings.append("empty or missing yaml metadata in repo card")
        return errors, warnings
    if not isinstance(data, dict):
        return ['"metadata" must be a YAML mapping (an object)'], warnings

    def str_or_list(key: str, check: Callable[[str], bool] | None = None, what: str = "") -> None:
        if key not in data or data[key] is None:
            return
        value = data[key]
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            errors.append(f'"{key}" must be a string or an array of strings')
            return
        if check is not None:
            for v in values:
                if not check(v):
                    errors.append(f'"{key}" contains an invalid value "{v}"{what}')

    def list_of_str(key: str) -> None:
        if key not in data or data[key] is None:
            return
        value = data[key]
        if isinstance(value, str):
            return  # the Hub accepts a single string too
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            errors.append(f'"{key}" must be an array of strings')

    if "license" in data and data["license"] is not None:
        lic = data["license"]
        lics = lic if isinstance(lic, list) else [lic]
        for one in lics:
            if not isinstance(one, str) or one not in KNOWN_LICENSES:
                errors.append(
                    f'"license" must be one of the license identifiers listed in the Hub docs, got "{one}"'
                    " (use \"other\" with license_name and license_link for a custom license)"
                )
        if "other" in lics and not data.get("license_name"):
            warnings.append('"license_name" should be set when "license" is "other"')
    str_or_list("language", lambda v: v == "multilingual" or bool(_LANG_RE.match(v)), " (expected ISO 639 codes)")
    list_of_str("datasets")
    list_of_str("tags")
    list_of_str("metrics")
    if "pipeline_tag" in data and data["pipeline_tag"] is not None:
        if not isinstance(data["pipeline_tag"], str) or data["pipeline_tag"] not in KNOWN_PIPELINE_TAGS:
            errors.append(f'"pipeline_tag" must be a valid Hub task, got "{data["pipeline_tag"]}"')
    str_or_list("base_model", lambda v: bool(_REPO_ID_RE.match(v)), " (expected a repo id)")
    if "base_model_relation" in data and data["base_model_relation"] is not None:
        if data["base_model_relation"] not in BASE_MODEL_RELATIONS:
            errors.append(
                f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}, '
                f'got "{data["base_model_relation"]}"'
            )
        elif not data.get("base_model"):
            errors.append('"base_model_relation" requires "base_model"')
    if "library_name" in data and data["library_name"] is not None and not isinstance(data["library_name"], str):
        errors.append('"library_name" must be a string')
    if "model-index" in data and data["model-index"] is not None and not isinstance(data["model-index"], list):
        errors.append('"model-index" must be an array')
    return errors, warnings


def card_data(content: bytes) -> dict | None:
    if yaml is None:
        return None
    try:
        text, _ = split_card(content.decode("utf-8"))
        data = yaml.safe_load(text) if text else None
    except Exception:
        return None
    if not isinstance(data, dict):
        return None
    return json.loads(json.dumps(data, default=str))


# --------------------------------------------------------------------------- the server


class Tokens(SimpleNamespace):
    """``hub.tokens.alice`` etc.; also indexable: ``hub.tokens["alice"]``."""

    def __getitem__(self, key: str) -> str:
        return getattr(self, key)


class HubServer:
    """In-memory Hub. See the module docstring for the API."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content
        self.users: dict[str, User] = {}
        self.orgs: set[str] = set()
        self.token_table: dict[str, Token] = {}
        self.log = RequestLog()
        self.faults = Faults()
        self.lfs_size_threshold = 10 * 1024 * 1024
        self.lfs_patterns: list[str] = list(DEFAULT_GITATTRIBUTES_PATTERNS) + ["*.gguf"]
        self.lfs_verify = True
        self.lfs_multipart_chunk_size: int | None = None
        self.tree_page_size = 1000
        self._tickets: dict[str, dict] = {}
        self._parts: dict[str, dict[int, bytes]] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._blackhole: socket.socket | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="int8-hubserver-")
        self._counter = 0
        self._monkeypatch: pytest.MonkeyPatch | None = None
        self.hf_home: Path | None = None

        alice = self.add_user("alice", orgs=("int8-org",), token="hf_alice_write_" + secrets.token_hex(8))
        self.tokens = Tokens(
            alice=alice,
            alice_read=self.add_token("alice", role="read", value="hf_alice_read_" + secrets.token_hex(8)),
            bob=self.add_user("bob", token="hf_bob_write_" + secrets.token_hex(8)),
            invalid="hf_invalid_" + secrets.token_hex(8),
        )

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "HubServer":
        server = self

        class Handler(_HubHandler):
            hub = server

        self._httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.port = self._httpd.server_address[1]
        self.endpoint = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hubserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; the port is closed (connections are refused afterwards)."""
        self.faults.clear()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._blackhole is not None:
            self._blackhole.close()
            self._blackhole = None

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def unresponsive_endpoint(self) -> str:
        """A port that accepts TCP connections (kernel backlog) and never answers."""
        if self._blackhole is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((self.host, 0))
            s.listen(128)
            self._blackhole = s
        return f"http://{self.host}:{self._blackhole.getsockname()[1]}"

    # ----------------------------------------------------------------- users

    def add_user(self, name: str, orgs: Iterable[str] = (), token: str | None = None, role: str = "write") -> str:
        """Create a user (and its orgs); returns a new token for it."""
        with self.lock:
            self.users[name] = User(name, tuple(orgs))
            self.orgs.update(orgs)
        return self.add_token(name, role=role, value=token)

    def add_token(self, user: str, role: str = "write", value: str | None = None) -> str:
        value = value or f"hf_{user}_{role}_{secrets.token_hex(8)}"
        with self.lock:
            self.token_table[value] = Token(value, self.users[user], role)
        return value

    def user_for(self, token: str) -> User | None:
        t = self.token_table.get(token)
        return t.user if t else None

    # ----------------------------------------------------------------- seeding

    def is_lfs(self, path: str, size: int, sample: bytes = b"") -> bool:
        """Whether the Hub would store this file with LFS."""
        name = path.rsplit("/", 1)[-1]
        for pat in self.lfs_patterns:
            if "/" in pat:
                if fnmatch.fnmatchcase(path, pat.replace("**/", "*")):
                    return True
            elif fnmatch.fnmatchcase(name, pat):
                return True
        if size >= self.lfs_size_threshold:
            return True
        return b"\x00" in sample[:512]

    def make_blob(self, path: str, data: bytes, lfs: bool | None = None) -> Blob:
        sha = hashlib.sha256(data).hexdigest()
        if lfs is None:
            lfs = self.is_lfs(path, len(data), data[:512])
        if len(data) == 0:
            lfs = False
        with self.lock:
            self.blobs[sha] = data
        git_oid = git_blob_sha(lfs_pointer(sha, len(data))) if lfs else git_blob_sha(data)
        return Blob(sha, len(data), lfs, git_oid)

    def _new_commit(self, repo: Repo, parent: str | None, tree: dict, title: str, message: str, author: str) -> Commit:
        with self.lock:
            self._counter += 1
            seed = f"{repo.repo_id}\0{parent}\0{title}\0{time.time_ns()}\0{self._counter}\0{uuid.uuid4()}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid, [parent] if parent else [], dict(tree), title, message, author, _now())
        repo.commits[oid] = commit
        return commit

    @staticmethod
    def _as_bytes(value) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, Path):
            return value.read_bytes()
        raise TypeError(f"file content must be bytes, str or Path, got {type(value)}")

    def create_repo(
        self,
        repo_id: str,
        files: dict | None = None,
        *,
        repo_type: str = "model",
        private: bool = False,
        gated: Any = False,
        lfs: Iterable[str] | None = None,
        gitattributes: bool = False,
        message: str = "Initial commit",
        author: str | None = None,
        exist_ok: bool = False,
    ) -> Repo:
        """Seed a repo directly. ``lfs``: paths forced to LFS (others: :meth:`is_lfs`).
        ``gitattributes=True`` adds the Hub's default ``.gitattributes``."""
        key = (repo_type, repo_id)
        with self.lock:
            if key in self.repos:
                if exist_ok:
                    return self.repos[key]
                raise ValueError(f"{repo_type} repo {repo_id} exists")
            repo = Repo(repo_type, repo_id, private=private, gated=gated)
            self.repos[key] = repo
            tree = {}
            if gitattributes:
                tree[".gitattributes"] = self.make_blob(".gitattributes", DEFAULT_GITATTRIBUTES, lfs=False)
            forced = set(lfs or ())
            for path, value in (files or {}).items():
                tree[path] = self.make_blob(path, self._as_bytes(value), lfs=True if path in forced else None)
                if tree[path].lfs:
                    repo.lfs_objects.add(tree[path].sha256)
            commit = self._new_commit(repo, None, tree, message, "", author or repo.namespace)
            repo.branches["main"] = commit.oid
        return repo

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def commit(
        self,
        repo_id: str,
        files: dict | None = None,
        delete: Iterable[str] = (),
        *,
        branch: str = "main",
        repo_type: str = "model",
        message: str = "Update files",
        lfs: Iterable[str] | None = None,
        author: str | None = None,
    ) -> str:
        """Seed a commit on ``branch`` (created from main if missing). Returns the commit oid."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            if branch not in repo.branches:
                repo.branches[branch] = repo.branches["main"]
            parent = repo.branches[branch]
            tree = dict(repo.commits[parent].tree)
            for path in delete:
                tree.pop(path, None)
            forced = set(lfs or ())
            for path, value in (files or {}).items():
                tree[path] = self.make_blob(path, self._as_bytes(value), lfs=True if path in forced else None)
                if tree[path].lfs:
                    repo.lfs_objects.add(tree[path].sha256)
            commit = self._new_commit(repo, parent, tree, message, "", author or repo.namespace)
            repo.branches[branch] = commit.oid
            return commit.oid

    def create_branch(self, repo_id: str, branch: str, from_rev: str = "main", repo_type: str = "model") -> str:
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            oid = repo.resolve(from_rev)
            if oid is None:
                raise KeyError(from_rev)
            repo.branches[branch] = oid
            return oid

    def create_tag(self, repo_id: str, tag: str, rev: str = "main", repo_type: str = "model") -> str:
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            oid = repo.resolve(rev)
            if oid is None:
                raise KeyError(rev)
            repo.tags[tag] = oid
            return oid

    def files(self, repo_id: str, rev: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """All files of ``repo_id`` at ``rev`` as {path: bytes}."""
        commit = self.repo(repo_id, repo_type).head(rev)
        return {p: self.blobs[b.sha256] for p, b in commit.tree.items()}

    def file_bytes(self, repo_id: str, path: str, rev: str = "main", repo_type: str = "model") -> bytes:
        return self.files(repo_id, rev, repo_type)[path]

    def blob(self, repo_id: str, path: str, rev: str = "main", repo_type: str = "model") -> Blob:
        return self.repo(repo_id, repo_type).head(rev).tree[path]

    # ----------------------------------------------------------------- client env

    def env(
        self,
        user: str | None = None,
        token: str | None = None,
        hf_home: str | os.PathLike | None = None,
        offline: bool = False,
        base: dict | None = None,
        **extra: str | None,
    ) -> dict:
        """Environment for a subprocess that uses this server (see module docstring)."""
        env = dict(os.environ if base is None else base)
        if hf_home is None:
            hf_home = tempfile.mkdtemp(prefix="hf-home-", dir=self._tmp.name)
        for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH",
                    "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN", "TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE"):
            env.pop(key, None)
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
        )
        if user is not None:
            token = getattr(self.tokens, user, None) or self.add_token(user)
        if token is not None:
            env["HF_TOKEN"] = token
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def patch_client(self, monkeypatch: pytest.MonkeyPatch, hf_home: str | os.PathLike | None = None) -> Path:
        """Point the in-process huggingface_hub at this server, with a fresh HF_HOME. Returns HF_HOME."""
        import huggingface_hub
        from huggingface_hub import constants, hf_api
        from huggingface_hub.utils import _http

        home = Path(hf_home) if hf_home is not None else Path(tempfile.mkdtemp(prefix="hf-home-", dir=self._tmp.name))
        home.mkdir(parents=True, exist_ok=True)
        ep = self.endpoint
        monkeypatch.setattr(constants, "ENDPOINT", ep)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", ep + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {self.host})
        monkeypatch.setattr(hf_api.api, "endpoint", ep)
        monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(ep)})
        monkeypatch.setattr(huggingface_hub, "HUGGINGFACE_CO_URL_TEMPLATE",
                            constants.HUGGINGFACE_CO_URL_TEMPLATE, raising=False)

        paths = {
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
            "default_cache_path": str(home / "hub"),
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
            "default_assets_cache_path": str(home / "assets"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        }
        for name, value in paths.items():
            monkeypatch.setattr(constants, name, value, raising=False)
        import sys

        for mod_name, attr, value in (
            ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", paths["HF_HUB_CACHE"]),
            ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", paths["HF_ASSETS_CACHE"]),
            ("transformers.utils.hub", "HF_MODULES_CACHE", str(home / "modules")),
        ):
            mod = sys.modules.get(mod_name)
            if mod is not None and hasattr(mod, attr):
                monkeypatch.setattr(mod, attr, value)

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_ENDPOINT", ep)
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                    "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_TOKEN_PATH"):
            monkeypatch.delenv(var, raising=False)
        self._monkeypatch = monkeypatch
        self.hf_home = home
        _http.close_session()  # no pooled connection to an earlier server
        return home

    def login(self, user_or_token: str | None) -> str | None:
        """Set ``HF_TOKEN`` for the in-process client (needs :meth:`patch_client`). ``None`` unsets it."""
        mp = self._require_patch()
        if user_or_token is None:
            mp.delenv("HF_TOKEN", raising=False)
            return None
        token = getattr(self.tokens, user_or_token, None) or user_or_token
        mp.setenv("HF_TOKEN", token)
        return token

    def offline(self, enabled: bool = True) -> None:
        """Turn HF_HUB_OFFLINE on/off for the in-process client (needs :meth:`patch_client`)."""
        from huggingface_hub import constants

        self._require_patch().setattr(constants, "HF_HUB_OFFLINE", enabled)

    def _require_patch(self) -> pytest.MonkeyPatch:
        if self._monkeypatch is None:
            raise RuntimeError("call hub.patch_client(monkeypatch) first (the `hub` fixture does)")
        return self._monkeypatch

    # ----------------------------------------------------------------- urls

    def repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{WEB_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ----------------------------------------------------------------- permissions

    def can_read(self, repo: Repo, user: User | None) -> bool:
        if not repo.private:
            return True
        return user is not None and repo.namespace in user.namespaces

    def can_write(self, repo_ns: str, token: Token | None) -> bool:
        return token is not None and token.role == "write" and repo_ns in token.user.namespaces


# --------------------------------------------------------------------------- request handler


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "int8-hubserver/1.0"
    timeout = 60  # seconds a keep-alive connection may idle

    def log_message(self, format, *args):  # noqa: A002 - keep pytest output quiet
        pass

    # ----------------------------------------------------------------- plumbing

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.raw_segments = [s for s in split.path.split("/") if s != ""]
        self.segments = [unquote(s) for s in self.raw_segments]
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.query_lists = parse_qs(split.query, keep_blank_values=True)
        self.record = RequestRecord(
            method=method,
            path=unquote(split.path),
            raw_path=self.path,
            query=dict(self.query),
            auth_sent=self.headers.get("Authorization") is not None,
            range=self.headers.get("Range"),
            headers={k: v for k, v in self.headers.items()},
        )
        self._body: bytes | None = None
        self._logged = False
        try:
            self._auth()
            self._route(method)
        except _Dropped:
            self.record.dropped = True
            self._log()
            self.close_connection = True
        except HubError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.record.dropped = True
            self._log()
            self.close_connection = True
        except Exception as e:  # a server bug: answer 500 so the test sees it
            import traceback

            traceback.print_exc()
            self._error(HubError(500, f"hubserver internal error: {e!r}"))

    def _log(self) -> None:
        if not self._logged:
            self._logged = True
            self.hub.log.append(self.record)

    def body(self) -> bytes:
        if self._body is None:
            self._body = self._read_body()
            self.record.request_bytes = len(self._body)
        return self._body

    def _read_body(self, stop_after: int | None = None) -> bytes:
        """Read the request body (Content-Length or chunked). With ``stop_after``, read at
        most that many bytes and reset the connection (fault injection)."""
        chunks = []
        got = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                if stop_after is not None and got + size >= stop_after:
                    chunks.append(self.rfile.read(max(stop_after - got, 0)))
                    self.record.request_bytes = got + len(chunks[-1])
                    self._reset()
                data = self.rfile.read(size)
                self.rfile.readline(65537)
                chunks.append(data)
                got += len(data)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if stop_after is not None:
                part = self.rfile.read(min(stop_after, length))
                self.record.request_bytes = len(part)
                self._reset()
            while got < length:
                data = self.rfile.read(min(1 << 20, length - got))
                if not data:
                    break
                chunks.append(data)
                got += len(data)
        return b"".join(chunks)

    def _reset(self) -> None:
        """Abort the connection with a TCP reset."""
        import struct

        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
        raise _Dropped()

    def _close(self) -> None:
        """Close the connection cleanly (FIN) in the middle of a response."""
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()
        except OSError:
            pass
        raise _Dropped()

    def json_body(self) -> Any:
        try:
            return json.loads(self.body() or b"null")
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    def send(self, status: int, body: bytes | str | dict | list = b"", headers: dict | None = None,
             content_type: str | None = None, head_length: int | None = None) -> None:
        """Send a full response. The request is logged before the body goes out."""
        if self._body is None and self.command in ("POST", "PUT", "DELETE"):
            self.body()  # keep the connection in sync
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            content_type = content_type or "application/json; charset=utf-8"
        elif isinstance(body, str):
            body = body.encode()
            content_type = content_type or "text/plain; charset=utf-8"
        self.record.status = status
        length = len(body) if head_length is None else head_length
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("X-Request-Id", "hubserver-" + uuid.uuid4().hex[:12])
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.record.response_bytes = len(body)
        self._log()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.wfile.flush()

    def _error(self, e: HubError) -> None:
        headers = {"X-Error-Message": e.message.encode("latin-1", "replace").decode("latin-1")}
        if e.code:
            headers["X-Error-Code"] = e.code
        headers.update(e.headers)
        body = e.body if e.body is not None else {"error": e.message}
        try:
            self.send(e.status, body, headers=headers)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _auth(self) -> None:
        self.token: Token | None = None
        self.user: User | None = None
        self.bad_token = False
        header = self.headers.get("Authorization")
        if header is None:
            return
        value = header.split(" ", 1)[1].strip() if header.lower().startswith("bearer ") else header.strip()
        tok = self.hub.token_table.get(value)
        if tok is None:
            self.bad_token = True  # answered 401 by _enter (upload URLs ignore credentials)
            return
        self.token = tok
        self.user = tok.user
        self.record.user = tok.user.name

    def _enter(self, kind: str, repo_type: str | None = None, repo_id: str | None = None,
               check_token: bool = True, **match) -> None:
        """Called once a request is classified: rejects unknown tokens, applies hang/status faults."""
        rec = self.record
        rec.kind = kind
        if repo_id is not None:
            rec.repo_id, rec.repo_type = repo_id, repo_type
        if check_token and self.bad_token:
            raise HubError(401, "Invalid credentials in Authorization header")
        f = self.hub.faults.take(kind, self.command, ("hang", "status"), repo_id=rec.repo_id, **match)
        if f is None:
            return
        if f.action == "hang":
            self.hub.faults.wait_released(timeout=120)
            raise _Dropped()
        if self.command in ("POST", "PUT", "DELETE"):
            self.body()
        raise HubError(f.status, f"Injected failure ({f.status})")

    def _drop_fault(self, **match) -> _Fault | None:
        return self.hub.faults.take(self.record.kind, self.command, ("drop",), repo_id=self.record.repo_id, **match)

    # ----------------------------------------------------------------- routing

    def _route(self, method: str) -> None:
        s = self.segments
        if not s:
            self._enter("unknown")
            raise HubError(404, "Not found")
        if s[0] == "_lfs":
            return self._lfs_object(method)
        if s[0] == "api":
            return self._api(method, s[1:])
        # /[type/]repo(.git)/...
        repo_type = "model"
        rest = s
        if s[0] in REPO_TYPES and len(s) > 2:
            repo_type, rest = REPO_TYPES[s[0]], s[1:]
        for i, seg in enumerate(rest[:2]):
            if seg.endswith(".git"):
                repo_id = "/".join(rest[:i] + [seg[:-4]])
                return self._lfs_api(method, repo_type, repo_id, rest[i + 1:])
        for i in (1, 2):
            if len(rest) > i and rest[i] in ("resolve", "raw"):
                repo_id = "/".join(rest[:i])
                # the revision is percent-encoded as one segment; the path may span several
                revision = rest[i + 1] if len(rest) > i + 1 else ""
                path = "/".join(rest[i + 2:])
                return self._resolve(method, repo_type, repo_id, revision, path)
        self._enter("unknown")
        raise HubError(404, f"Not found: {self.record.path}")

    def _api(self, method: str, s: list[str]) -> None:
        routes = {
            ("GET", ("whoami-v2",)): ("whoami", self._whoami),
            ("POST", ("repos", "create")): ("create-repo", self._create_repo),
            ("DELETE", ("repos", "delete")): ("delete-repo", self._delete_repo),
            ("POST", ("validate-yaml",)): ("validate-yaml", self._validate_yaml),
            # the `hf` CLI asks for the AI-agent registry; an empty one disables detection
            ("GET", ("agent-harnesses",)): ("agent-harnesses",
                                            lambda: self.send(200, {"standardEnvVars": [], "harnesses": {}})),
        }
        hit = routes.get((method, tuple(s)))
        if hit is not None:
            self._enter(hit[0])
            return hit[1]()
        if len(s) >= 2 and s[0] in REPO_TYPES:
            repo_type = REPO_TYPES[s[0]]
            rest = s[1:]
            if len(rest) >= 2 and rest[1] not in API_SUBPATHS:
                repo_id, sub = "/".join(rest[:2]), rest[2:]
            elif len(rest) >= 2 and (repo_type, "/".join(rest[:2])) in self.hub.repos:
                repo_id, sub = "/".join(rest[:2]), rest[2:]
            else:
                repo_id, sub = rest[0], rest[1:]
            return self._repo_api(method, repo_type, repo_id, sub)
        self._enter("unknown")
        raise HubError(404, f"Not found: {self.record.path}")

    def _repo_api(self, method: str, repo_type: str, repo_id: str, sub: list[str]) -> None:
        head = sub[0] if sub else ""
        n = len(sub)
        route: tuple | None = None
        if not sub and method == "GET":
            route = ("repo-info", lambda: self._repo_info(repo_type, repo_id, "main"))
        elif head == "revision" and method == "GET" and n >= 2:
            route = ("repo-info", lambda: self._repo_info(repo_type, repo_id, sub[1]))
        elif head == "tree" and method == "GET" and n >= 2:
            route = ("tree", lambda: self._tree(repo_type, repo_id, sub[1], "/".join(sub[2:])))
        elif head == "paths-info" and method == "POST" and n >= 2:
            route = ("paths-info", lambda: self._paths_info(repo_type, repo_id, sub[1]))
        elif head == "refs" and method == "GET":
            route = ("refs", lambda: self._refs(repo_type, repo_id))
        elif head == "commits" and method == "GET":
            route = ("commits", lambda: self._commits(repo_type, repo_id, sub[1] if n > 1 else "main"))
        elif head == "preupload" and method == "POST" and n >= 2:
            route = ("preupload", lambda: self._preupload(repo_type, repo_id, sub[1]))
        elif head == "commit" and method == "POST" and n >= 2:
            route = ("commit", lambda: self._commit(repo_type, repo_id, sub[1]))
        elif head == "branch" and n >= 2 and method in ("POST", "DELETE"):
            route = ("branch", lambda: self._branch(method, repo_type, repo_id, sub[1]))
        elif head == "tag" and n >= 2 and method in ("POST", "DELETE"):
            route = ("tag", lambda: self._tag(method, repo_type, repo_id, sub[1]))
        elif head == "settings" and method == "PUT":
            route = ("settings", lambda: self._settings(repo_type, repo_id))
        elif head == "auth-check" and method == "GET":
            route = ("auth-check", lambda: (self._read_repo(repo_type, repo_id), self.send(200, {})))
        self._enter(route[0] if route else "unknown", repo_type, repo_id)
        if route is None:
            raise HubError(404, f"Not found: {self.record.path}")
        if head in ("revision", "tree", "paths-info", "commits", "preupload", "commit") and n >= 2:
            self.record.revision = sub[1]
        route[1]()

    # ----------------------------------------------------------------- helpers

    def _find_repo(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.hub.repos.get((repo_type, repo_id))

    def _not_found(self) -> HubError:
        # The Hub hides private repos: 401 without credentials, 404 with. Always RepoNotFound.
        return HubError(
            401 if self.user is None else 404,
            "Repository not found",
            code="RepoNotFound",
        )

    def _read_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._find_repo(repo_type, repo_id)
        if repo is None or not self.hub.can_read(repo, self.user):
            raise self._not_found()
        return repo

    def _write_repo(self, repo_type: str, repo_id: str, pr_ok: bool = False) -> Repo:
        """Repo the caller may push to (``pr_ok``: any authenticated reader may, for PRs)."""
        repo = self._read_repo(repo_type, repo_id)
        if pr_ok and self.user is not None:
            return repo
        if self.token is None:
            raise HubError(401, "You must be authenticated to write to this repo")
        if not self.hub.can_write(repo.namespace, self.token):
            raise HubError(403, f"You don't have the rights to write to {repo_id}: forbidden")
        return repo

    def _commit_for(self, repo: Repo, rev: str) -> Commit:
        oid = repo.resolve(rev)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return repo.commits[oid]

    def _file_entry(self, path: str, blob: Blob, commit: Commit | None = None) -> dict:
        entry = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
        if blob.lfs:
            pointer_size = len(lfs_pointer(blob.sha256, blob.size))
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": pointer_size}
        if commit is not None:
            entry["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": _iso(commit.date)}
        return entry

    @staticmethod
    def _dir_entry(path: str, tree: dict, commit: Commit | None = None) -> dict:
        inner = sorted((p, b.git_oid) for p, b in tree.items() if p.startswith(path + "/"))
        entry = {"type": "directory", "oid": hashlib.sha1(repr(inner).encode()).hexdigest(), "size": 0, "path": path}
        if commit is not None:
            entry["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": _iso(commit.date)}
        return entry

    # ----------------------------------------------------------------- endpoints: account

    def _whoami(self) -> None:
        if self.token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        u = self.user
        self.send(200, {
            "type": "user",
            "id": hashlib.md5(u.name.encode()).hexdigest()[:24],
            "name": u.name,
            "fullname": u.name.title(),
            "email": f"{u.name}@example.com",
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": "",
            "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write", "avatarUrl": ""}
                     for o in u.orgs],
            "auth": {"type": "access_token", "accessToken": {
                "displayName": f"{u.name}-{self.token.role}", "role": self.token.role,
                "createdAt": _iso(_now())}},
        })

    def _create_repo(self) -> None:
        payload = self.json_body() or {}
        if self.token is None:
            raise HubError(401, "You must be authenticated to create a repo")
        name = payload.get("name")
        if not name or not re.match(r"^[A-Za-z0-9][\w.\-]*$", name) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo name: {name!r}")
        ns = payload.get("organization") or self.user.name
        repo_type = payload.get("type") or "model"
        if repo_type not in WEB_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        repo_id = f"{ns}/{name}"
        visibility = payload.get("visibility")
        private = bool(payload.get("private")) if visibility is None else visibility == "private"
        with self.hub.lock:
            existing = self._find_repo(repo_type, repo_id)
            if existing is not None and self.hub.can_read(existing, self.user):
                raise HubError(409, f"You already created this {repo_type} repo",
                               body={"error": f"You already created this {repo_type} repo",
                                     "url": self.hub.repo_url(existing)})
            if not self.hub.can_write(ns, self.token):
                raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{ns}"')
            if existing is not None:
                raise HubError(409, f"You already created this {repo_type} repo",
                               body={"error": f"You already created this {repo_type} repo",
                                     "url": self.hub.repo_url(existing)})
            repo = self.hub.create_repo(repo_id, repo_type=repo_type, private=private, gitattributes=True,
                                        message="initial commit", author=self.user.name)
        self.record.repo_id, self.record.repo_type = repo_id, repo_type
        self.send(200, {"url": self.hub.repo_url(repo), "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def _delete_repo(self) -> None:
        payload = self.json_body() or {}
        if self.token is None:
            raise HubError(401, "You must be authenticated to delete a repo")
        ns = payload.get("organization") or self.user.name
        repo_type = payload.get("type") or "model"
        repo_id = f"{ns}/{payload.get('name')}"
        self.record.repo_id = repo_id
        repo = self._write_repo(repo_type, repo_id)
        with self.hub.lock:
            self.hub.repos.pop((repo.repo_type, repo.repo_id), None)
        self.send(200, {})

    def _validate_yaml(self) -> None:
        payload = self.json_body() or {}
        content = payload.get("content")
        if not isinstance(content, str):
            raise HubError(400, '"content" must be a string')
        errors, warnings = validate_card_metadata(content, payload.get("repoType") or "model")
        plain = "text/plain" in (self.headers.get("Accept") or "") and "json" not in (self.headers.get("Accept") or "")
        if errors:
            if plain:
                return self.send(400, "\n".join(errors), headers={"X-Error-Message": errors[0][:200]})
            return self.send(400, {"errors": [{"message": m} for m in errors],
                                   "warnings": [{"message": m} for m in warnings]})
        if plain:
            return self.send(200, "OK")
        self.send(200, {"errors": [], "warnings": [{"message": m} for m in warnings]})

    # ----------------------------------------------------------------- endpoints: read

    def _repo_info(self, repo_type: str, repo_id: str, rev: str) -> None:
        repo = self._read_repo(repo_type, repo_id)
        self.record.revision = rev
        commit = self._commit_for(repo, rev)
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.tree):
            b = commit.tree[path]
            sib = {"rfilename": path}
            if blobs:
                sib.update(size=b.size, blobId=b.git_oid)
                if b.lfs:
                    sib["lfs"] = {"sha256": b.sha256, "size": b.size,
                                  "pointerSize": len(lfs_pointer(b.sha256, b.size))}
            siblings.append(sib)
        card = card_data(self.hub.blobs[commit.tree["README.md"].sha256]) if "README.md" in commit.tree else None
        info = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo.namespace or None,
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card.get("tags") or []) if card and isinstance(card.get("tags"), list) else [],
            "siblings": siblings,
            "usedStorage": sum(b.size for b in commit.tree.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
            if card:
                if isinstance(card.get("library_name"), str):
                    info["library_name"] = card["library_name"]
                if isinstance(card.get("pipeline_tag"), str):
                    info["pipeline_tag"] = card["pipeline_tag"]
        if card is not None:
            info["cardData"] = card
        self.send(200, info)

    def _tree(self, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        repo = self._read_repo(repo_type, repo_id)
        self.record.revision, self.record.filename = rev, path or None
        commit = self._commit_for(repo, rev)
        path = path.strip("/")
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        expand = self.query.get("expand", "").lower() in ("1", "true")
        last = commit if expand else None
        prefix = path + "/" if path else ""
        if path and path in commit.tree:
            raise HubError(404, f"{path} is a file, not a directory", code="EntryNotFound")
        files = {p: b for p, b in commit.tree.items() if p.startswith(prefix)}
        if path and not files:
            raise HubError(404, f"Path {path} not found in revision {rev}", code="EntryNotFound",
                           headers={"X-Repo-Commit": commit.oid})
        entries: dict[str, dict] = {}
        for p, b in files.items():
            rel = p[len(prefix):]
            parts = rel.split("/")
            if recursive:
                for i in range(1, len(parts)):
                    d = prefix + "/".join(parts[:i])
                    if d not in entries:
                        entries[d] = self._dir_entry(d, commit.tree, last)
                entries[p] = self._file_entry(p, b, last)
            elif len(parts) == 1:
                entries[p] = self._file_entry(p, b, last)
            else:
                d = prefix + parts[0]
                if d not in entries:
                    entries[d] = self._dir_entry(d, commit.tree, last)
        ordered = sorted(entries.values(), key=lambda e: (e["type"] != "directory", e["path"]))
        cursor = int(self.query.get("cursor") or 0)
        size = max(1, int(self.hub.tree_page_size))
        page = ordered[cursor:cursor + size]
        headers = {"X-Repo-Commit": commit.oid}
        if cursor + size < len(ordered):
            suffix = "/" + quote(path, safe="") if path else ""
            url = (f"{self.hub.endpoint}/api/{repo_type}s/{repo_id}/tree/{quote(rev, safe='')}{suffix}"
                   f"?recursive={str(recursive).lower()}&expand={str(expand).lower()}&cursor={cursor + size}")
            headers["Link"] = f'<{url}>; rel="next"'
        self.send(200, page, headers=headers)

    def _paths_info(self, repo_type: str, repo_id: str, rev: str) -> None:
        repo = self._read_repo(repo_type, repo_id)
        commit = self._commit_for(repo, rev)
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            data = self.json_body() or {}
            paths, expand = data.get("paths", []), bool(data.get("expand"))
        else:
            form = parse_qs(self.body().decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), (form.get("expand", ["false"])[-1].lower() == "true")
        last = commit if expand else None
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.tree:
                out.append(self._file_entry(p, commit.tree[p], last))
            elif any(q.startswith(p + "/") for q in commit.tree):
                out.append(self._dir_entry(p, commit.tree, last))
        self.send(200, out, headers={"X-Repo-Commit": commit.oid})

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._read_repo(repo_type, repo_id)
        data = {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.branches.items()],
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in repo.tags.items()],
        }
        if self.query.get("include_prs") in ("1", "true", "True"):
            data["pullRequests"] = [{"name": ref, "ref": ref, "targetCommit": o} for ref, o in repo.pr_heads.items()]
        self.send(200, data)

    def _commits(self, repo_type: str, repo_id: str, rev: str) -> None:
        repo = self._read_repo(repo_type, repo_id)
        commit = self._commit_for(repo, rev)
        out = []
        while commit is not None:
            out.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                        "date": _iso(commit.date), "authors": [{"user": commit.author, "avatar": ""}]})
            commit = repo.commits[commit.parents[0]] if commit.parents else None
        self.send(200, out)

    def _resolve(self, method: str, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        rec = self.record
        rec.revision, rec.filename = rev, path
        self._enter("resolve", repo_type, repo_id, filename=path)
        if not rev or not path:
            raise HubError(404, "Missing revision or path", code="EntryNotFound")
        if method not in ("GET", "HEAD"):
            raise HubError(405, "Method not allowed")
        repo = self._read_repo(repo_type, repo_id)
        commit = self._commit_for(repo, rev)
        blob = commit.tree.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        if repo.gated and path not in ("README.md", ".gitattributes"):
            allowed = self.user is not None and (
                repo.namespace in self.user.namespaces or self.user.name in repo.granted)
            if not allowed:
                raise HubError(401 if self.user is None else 403,
                               f"Access to model {repo_id} is restricted. You must have access to it and be "
                               "authenticated to access it. Please log in.", code="GatedRepo")
        rec.oid = blob.sha256
        data = self.hub.blobs[blob.sha256]
        headers = {
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename*=UTF-8\'\'{quote(path.rsplit("/", 1)[-1])}; '
                                   f'filename="{path.rsplit("/", 1)[-1]}";',
            "Cache-Control": "private, max-age=0, must-revalidate" if repo.private else "public, max-age=0",
        }
        if blob.lfs:
            headers["ETag"] = f'"{blob.git_oid}"'
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
        else:
            headers["ETag"] = f'"{blob.git_oid}"'
        status, start, end = 200, 0, len(data)
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", rng)
            if not m or (not m.group(1) and not m.group(2)):
                raise HubError(416, f"Invalid range {rng}", headers={"Content-Range": f"bytes */{len(data)}"})
            a, b = m.group(1), m.group(2)
            if a:
                start = int(a)
                end = min(int(b) + 1, len(data)) if b else len(data)
            else:
                start, end = max(len(data) - int(b), 0), len(data)
            if start >= len(data) or start >= end:
                raise HubError(416, f"Range not satisfiable: {rng}", headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        if method == "GET":
            fault = self._drop_fault(filename=path, oid=blob.sha256)
            if fault is not None:  # drop: headers + part of the body, then reset
                cut = int(len(body) * fault.fraction)
                rec.status = status
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                rec.response_bytes = cut
                rec.dropped = True
                self._log()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                if fault.reset:
                    time.sleep(0.05)
                    self._reset()
                self._close()
        self.send(status, body, headers=headers, content_type="application/octet-stream",
                  head_length=len(body) if method == "HEAD" else None)

    # ----------------------------------------------------------------- endpoints: write

    def _settings(self, repo_type: str, repo_id: str) -> None:
        repo = self._write_repo(repo_type, repo_id)
        payload = self.json_body() or {}
        with self.hub.lock:
            if "private" in payload:
                repo.private = bool(payload["private"])
            if "visibility" in payload:
                repo.private = payload["visibility"] == "private"
            if "gated" in payload:
                repo.gated = payload["gated"]
        self.send(200, {})

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._write_repo(repo_type, repo_id)
        self.record.revision = branch
        with self.hub.lock:
            if method == "DELETE":
                if branch not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
                return self.send(200, {})
            payload = self.json_body() or {}
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            start = payload.get("startingPoint") or "main"
            oid = repo.resolve(start)
            if oid is None:
                raise HubError(404, f"Invalid rev id: {start}", code="RevisionNotFound")
            if payload.get("emptyBranch"):
                oid = self.hub._new_commit(repo, None, {}, "empty branch", "", self.user.name).oid
            repo.branches[branch] = oid
        self.send(200, {})

    def _tag(self, method: str, repo_type: str, repo_id: str, arg: str) -> None:
        repo = self._write_repo(repo_type, repo_id)
        with self.hub.lock:
            if method == "DELETE":
                if arg not in repo.tags:
                    raise HubError(404, f"Invalid rev id: {arg}", code="RevisionNotFound")
                del repo.tags[arg]
                return self.send(200, {})
            payload = self.json_body() or {}
            tag = payload.get("tag")
            if not tag:
                raise HubError(400, '"tag" is required')
            oid = repo.resolve(arg)
            if oid is None:
                raise HubError(404, f"Invalid rev id: {arg}", code="RevisionNotFound")
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = oid
            self.record.revision = arg
        self.send(200, {})

    def _gitignore_patterns(self, commit: Commit | None, payload: dict) -> list[str]:
        text = payload.get("gitIgnore")
        if text is None and commit is not None and ".gitignore" in commit.tree:
            text = self.hub.blobs[commit.tree[".gitignore"].sha256].decode("utf-8", "replace")
        pats = []
        for line in (text or "").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                pats.append(line)
        return pats

    @staticmethod
    def _ignored(path: str, patterns: list[str]) -> bool:
        ignored = False
        name = path.rsplit("/", 1)[-1]
        for pat in patterns:
            neg = pat.startswith("!")
            p = pat[1:] if neg else pat
            p = p.lstrip("/")
            hit = fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(name, p) or path.startswith(p.rstrip("/") + "/")
            if hit:
                ignored = not neg
        return ignored

    def _preupload(self, repo_type: str, repo_id: str, rev: str) -> None:
        create_pr = self.query.get("create_pr") in ("1", "true")
        repo = self._write_repo(repo_type, repo_id, pr_ok=create_pr or _PR_RE.match(rev) is not None)
        self.record.revision = rev
        payload = self.json_body() or {}
        commit = self._commit_for(repo, rev)
        patterns = self._gitignore_patterns(commit, payload)
        out = []
        for f in payload.get("files", []):
            path, size = f["path"], int(f.get("size", 0))
            sample = base64.b64decode(f.get("sample") or "")
            mode = "lfs" if self.hub.is_lfs(path, size, sample) else "regular"
            entry = {"path": path, "uploadMode": mode, "shouldIgnore": self._ignored(path, patterns)}
            existing = commit.tree.get(path)
            entry["oid"] = existing.local_oid if existing is not None and existing.lfs == (mode == "lfs") else None
            out.append(entry)
        self.send(200, {"files": out, "commitOid": commit.oid})

    def _commit(self, repo_type: str, repo_id: str, rev: str) -> None:
        create_pr = self.query.get("create_pr") in ("1", "true")
        pr_match = _PR_RE.match(rev)
        repo = self._write_repo(repo_type, repo_id, pr_ok=create_pr or pr_match is not None)
        self.record.revision = rev
        lines = [ln for ln in self.body().split(b"\n") if ln.strip()]
        try:
            items = [json.loads(ln) for ln in lines]
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid ndjson payload: {e}") from e
        if not items or items[0].get("key") != "header":
            raise HubError(400, "The first line of the payload must be the commit header")
        header = items[0].get("value") or {}
        summary = header.get("summary") or ""
        if not summary.strip():
            raise HubError(400, "Commit summary is required")
        parent_commit = header.get("parentCommit")
        with self.hub.lock:
            if create_pr:
                if rev not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
                start = repo.branches[rev]
                if parent_commit:
                    start = self._match_commit(repo, parent_commit)
                num = repo.next_discussion
                repo.next_discussion += 1
                ref = f"refs/pr/{num}"
                repo.pull_requests[num] = PullRequest(num, ref, rev, self.user.name, summary)
                repo.pr_heads[ref] = start
                target, target_is_pr = ref, True
            elif pr_match:
                if rev not in repo.pr_heads:
                    raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
                target, target_is_pr = rev, True
            else:
                if rev not in repo.branches:
                    if repo.resolve(rev) is not None:
                        raise HubError(400, f"Invalid rev id: {rev} is not a branch")
                    raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
                target, target_is_pr = rev, False
            parent_oid = repo.pr_heads[target] if target_is_pr else repo.branches[target]
            if parent_commit and not create_pr and not parent_oid.startswith(parent_commit):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[parent_oid].tree)
            for item in items[1:]:
                key, value = item.get("key"), item.get("value") or {}
                path = (value.get("path") or "").lstrip("/")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        data = (value.get("content") or "").encode()
                    else:
                        data = base64.b64decode(value.get("content") or "")
                    tree[path] = self.hub.make_blob(path, data, lfs=False)
                elif key == "lfsFile":
                    oid = value.get("oid")
                    if oid not in repo.lfs_objects or oid not in self.hub.blobs:
                        raise HubError(422, f"Your push was rejected because an LFS pointer pointed to a file that "
                                            f"does not exist. Offending file: - {path}")
                    size = value.get("size")
                    if size is not None and int(size) != len(self.hub.blobs[oid]):
                        raise HubError(422, f"LFS object size mismatch for {path}")
                    data = self.hub.blobs[oid]
                    tree[path] = Blob(oid, len(data), True, git_blob_sha(lfs_pointer(oid, len(data))))
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                    del tree[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                    for p in doomed:
                        del tree[p]
                else:
                    raise HubError(400, f"Unknown commit operation: {key}")
            commit = self.hub._new_commit(repo, parent_oid, tree, summary, header.get("description") or "",
                                          self.user.name)
            if target_is_pr:
                repo.pr_heads[target] = commit.oid
            else:
                repo.branches[target] = commit.oid
            pr_url = None
            if target_is_pr:
                num = int(target.rsplit("/", 1)[1])
                pr_url = f"{self.hub.repo_url(repo)}/discussions/{num}"
        self.send(200, {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.hub.repo_url(repo)}/commit/{commit.oid}",
            "hookOutput": "",
            "pullRequestUrl": pr_url,
        })

    @staticmethod
    def _match_commit(repo: Repo, prefix: str) -> str:
        hits = [o for o in repo.commits if o.startswith(prefix)]
        if len(hits) != 1:
            raise HubError(404, f"Invalid rev id: {prefix}", code="RevisionNotFound")
        return hits[0]

    # ----------------------------------------------------------------- LFS

    def _lfs_api(self, method: str, repo_type: str, repo_id: str, rest: list[str]) -> None:
        if rest == ["info", "lfs", "objects", "batch"] and method == "POST":
            self._enter("lfs-batch", repo_type, repo_id)
            return self._lfs_batch(repo_type, repo_id)
        if rest == ["info", "lfs", "objects", "verify"] and method == "POST":
            self._enter("lfs-verify", repo_type, repo_id)
            repo = self._read_repo(repo_type, repo_id)
            payload = self.json_body() or {}
            oid, size = payload.get("oid"), payload.get("size")
            self.record.oid = oid
            if oid in repo.lfs_objects and oid in self.hub.blobs and len(self.hub.blobs[oid]) == size:
                return self.send(200, {"oid": oid, "size": size})
            raise HubError(404, f"LFS object {oid} not found")
        self._enter("unknown", repo_type, repo_id)
        raise HubError(404, f"Not found: {self.record.path}")

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        payload = self.json_body() or {}
        ref = (payload.get("ref") or {}).get("name")
        repo = self._write_repo(repo_type, repo_id, pr_ok=ref is None or _PR_RE.match(ref or "") is not None)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported by the test server")
        if ref is not None and repo.resolve(ref) is None:
            raise HubError(404, f"Invalid rev id: {ref}", code="RevisionNotFound")
        objects = []
        chunk = self.hub.lfs_multipart_chunk_size
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int):
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            if oid in repo.lfs_objects and oid in self.hub.blobs:
                if len(self.hub.blobs[oid]) != size:
                    objects.append({"oid": oid, "size": size,
                                    "error": {"code": 422, "message": "Size does not match the stored object"}})
                else:
                    objects.append({"oid": oid, "size": size, "authenticated": True})  # no action: already there
                continue
            ticket = secrets.token_urlsafe(16)
            with self.hub.lock:
                self.hub._tickets[ticket] = {"repo": (repo_type, repo_id), "oid": oid, "size": size}
            href = f"{self.hub.endpoint}/_lfs/{ticket}"
            upload: dict = {"href": href}
            if chunk and size > chunk:
                n = (size + chunk - 1) // chunk
                upload["header"] = {"chunk_size": str(chunk),
                                    **{str(i): f"{href}/part/{i}" for i in range(1, n + 1)}}
            actions = {"upload": upload}
            if self.hub.lfs_verify:
                actions["verify"] = {
                    "href": f"{self.hub.endpoint}/{WEB_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify",
                    "header": {"Authorization": self.headers.get("Authorization", "")},
                }
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        self.send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                  content_type="application/vnd.git-lfs+json")

    def _lfs_object(self, method: str) -> None:
        s = self.segments
        ticket = self.hub._tickets.get(s[1]) if len(s) >= 2 else None
        if ticket is None:
            self._enter("lfs-upload", check_token=False)
            raise HubError(404, "Unknown upload URL")
        repo_type, repo_id = ticket["repo"]
        oid, size = ticket["oid"], ticket["size"]
        self.record.oid = oid
        if len(s) == 2 and method == "PUT":
            self._enter("lfs-upload", repo_type, repo_id, check_token=False, oid=oid)
            fault = self._drop_fault(oid=oid)
            if fault is not None:
                self._read_body(stop_after=int(size * fault.fraction))
            data = self.body()
            return self._store_object(repo_type, repo_id, oid, size, data)
        if len(s) == 4 and s[2] == "part" and method == "PUT":
            self._enter("lfs-upload-part", repo_type, repo_id, check_token=False, oid=oid)
            fault = self._drop_fault(oid=oid)
            length = int(self.headers.get("Content-Length") or 0)
            if fault is not None:
                self._read_body(stop_after=int(length * fault.fraction))
            data = self.body()
            with self.hub.lock:
                self.hub._parts.setdefault(s[1], {})[int(s[3])] = data
            return self.send(200, b"", headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
        if len(s) == 2 and method == "POST":
            self._enter("lfs-complete", repo_type, repo_id, check_token=False, oid=oid)
            payload = self.json_body() or {}
            parts = self.hub._parts.get(s[1], {})
            numbers = [p["partNumber"] for p in payload.get("parts", [])]
            if payload.get("oid") != oid or not numbers or any(n not in parts for n in numbers):
                raise HubError(400, "Incomplete multipart upload")
            for p in payload["parts"]:
                if p.get("etag", "").strip('"') != hashlib.md5(parts[p["partNumber"]]).hexdigest():
                    raise HubError(400, f"ETag mismatch for part {p['partNumber']}")
            data = b"".join(parts[n] for n in sorted(numbers))
            return self._store_object(repo_type, repo_id, oid, size, data)
        self._enter("unknown", repo_type, repo_id, check_token=False)
        raise HubError(405, "Method not allowed")

    def _store_object(self, repo_type: str, repo_id: str, oid: str, size: int, data: bytes) -> None:
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
        with self.hub.lock:
            self.hub.blobs[oid] = data
            repo = self.hub.repos.get((repo_type, repo_id))
            if repo is not None:
                repo.lfs_objects.add(oid)
        self.send(200, b"")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def hub_server():
    """A started :class:`HubServer`; the in-process client is not patched."""
    server = HubServer().start()
    try:
        yield server
    finally:
        server.faults.clear()
        server.close()


@pytest.fixture
def hub(hub_server, monkeypatch, tmp_path):
    """A started :class:`HubServer` with the in-process huggingface_hub pointed at it and a
    fresh HF_HOME (``hub.hf_home``) under ``tmp_path``."""
    hub_server.patch_client(monkeypatch, tmp_path / "hf_home")
    yield hub_server
    from huggingface_hub.utils import _http

    hub_server.faults.clear()
    _http.close_session()


class _FastTime:
    """``time`` module stand-in whose ``sleep`` returns at once."""

    def __init__(self) -> None:
        import time as _time

        self._time = _time
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def __getattr__(self, name: str):
        return getattr(self._time, name)


@pytest.fixture
def fast_retries(monkeypatch):
    """Make huggingface_hub's retry back-off sleeps instant (in-process only).
    Yields the fake time object; ``.sleeps`` lists the skipped sleeps."""
    import huggingface_hub.file_download as fd
    from huggingface_hub.utils import _http

    fake = _FastTime()
    monkeypatch.setattr(_http, "time", fake)
    monkeypatch.setattr(fd, "time", fake)
    yield fake
