"""The structure checks as they apply to who wrote the checkpoint (`int8.verify.provenance`).

int8's own outputs keep every check; one whose report was removed (its card
still says int8 wrote it) fails the ``report`` check saying so. For another
tool's checkpoint the checks of int8's own files are skipped with the reason
(``report``, ``sha256``, ``files``, ``card``) and the code -128 is legal
(``codes``); the rest (config, index, tensors, scales, finite, tokenizer),
loading and fidelity decide. `unsupported` is the whole structure result for
another tool's checkpoint in a scheme verify does not check.
"""

from __future__ import annotations

from ...report import REPORT_NAME
from ..provenance import Origin
from ..result import Check, Group, outcome, skipped

INT8_ONLY = {
    "report": f"there is no {REPORT_NAME} (int8's conversion report) to check",
    "sha256": "there is no manifest (int8_report.json) to check the files against",
    "files": "int8 push publishes int8's own conversions only",
    "card": "int8's model-card metadata does not apply",
}
"""The checks of files only int8 writes, and why another tool's checkpoint skips each."""


def for_origin(checks: tuple[Check, ...], origin: Origin) -> tuple[Check, ...]:
    """``checks`` as they apply to a checkpoint written by ``origin``."""
    if origin.own:
        if not origin.report_removed:
            return checks
        return tuple(_report_removed(c, origin) if c.name == "report" else c for c in checks)
    return tuple(_foreign(c, origin) for c in checks)


def _report_removed(check: Check, origin: Origin) -> Check:
    card = next(m for m in origin.marks if m != REPORT_NAME)
    problem = (
        f"{REPORT_NAME} is missing, but {card} says int8 wrote this folder: its conversion report, with the "
        "manifest, was removed, so nothing vouches for its bytes (convert again to repair it)"
    )
    return outcome("report", [problem], figure="missing (removed)", threshold=check.threshold)


def _foreign(check: Check, origin: Origin) -> Check:
    if check.name in INT8_ONLY:
        return skipped(check.name, f"{origin.why}: {INT8_ONLY[check.name]}", group=check.group, threshold=check.threshold)
    if check.name == "codes":
        minus = len(check.problems) + check.left_off  # the only problem the data pass finds in codes is -128
        figure = check.figure.split(";")[0] + (f"; -128 in {minus} tensor(s)" if minus else "")
        return Check("codes", True, figure=figure, threshold=f"every code in [-128, 127] ({origin.why}: -128 is legal)",
                     group=check.group)
    return check


def unsupported(origin: Origin, scheme: str, contained: Check, names: tuple[str, ...]) -> tuple[Check, ...]:
    """The structure checks of another tool's checkpoint in a scheme verify does not check: ``config``
    fails with the scheme, the others are not run (they would judge it by rules that are not its own)."""
    why = "a scheme int8 verify does not check, so its tensors were not read"
    config = outcome("config", [scheme], figure="unsupported scheme",
                     threshold="compressed-tensors pack-quantized, 8-bit symmetric int weights in groups, weight-only")
    rest = {n: skipped(n, why, group=Group.STRUCTURE) for n in names if n != "config"}
    rest["report"] = skipped("report", f"{origin.why}: {INT8_ONLY['report']}", group=Group.STRUCTURE)
    return (contained, *(config if n == "config" else rest[n] for n in names))
