"""How `int8 verify` shows its result to people: a rich table, the failures spelled out, and the model card."""

from __future__ import annotations

from pathlib import Path

from ..errors import Int8Error
from .provenance import NO_MARKS, NOT_INT8
from .result import FAIL, PASS, SKIP, Group, VerifyResult

_STYLE = {PASS: "[green]pass[/]", FAIL: "[bold red]FAIL[/]", SKIP: "[yellow]skip[/]"}


def result_table(result: VerifyResult):
    """check | result | figure | threshold, one row per check."""
    from rich.markup import escape
    from rich.table import Table

    title = f"int8 verify {result.target}" + (" (quick)" if result.quick else "")
    table = Table(title=title, title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("figure", overflow="fold")
    table.add_column("threshold", overflow="fold")
    group = None
    for c in result.checks:
        if group is not None and c.group != group:
            table.add_section()
        group = c.group
        table.add_row(c.name, _STYLE[c.status], escape(c.figure), escape(c.threshold))
    return table


def summary(result: VerifyResult) -> str:
    if result.unsupported:
        return f"[bold red]NOT CHECKED[/]: {result.unsupported}; {result.seconds:.1f} s"
    failed = result.failures
    n_skip = sum(c.status is SKIP for c in result.checks)
    skipped = f", {n_skip} skipped" if n_skip else ""
    against = f" against {result.against}" if result.against else ""
    if failed:
        return (
            f"[bold red]FAILED[/]: {len(failed)} of {len(result.checks)} checks failed "
            f"({', '.join(c.name for c in failed)}){skipped}; {result.seconds:.1f} s"
        )
    return f"[bold green]PASSED[/]: {len(result.checks) - n_skip} checks{against}{skipped}; {result.seconds:.1f} s"


def print_result(out, err, result: VerifyResult, quiet: bool = False) -> None:
    """The table on ``out`` (unless quiet), every failure's problems and the verdict on ``err``."""
    from rich.markup import escape

    if not quiet:
        out.print(result_table(result))
    for c in result.failures:
        err.print(f"[bold red]{c.name}[/] failed:")
        for p in c.problems or [c.detail]:
            err.print(f"  - {escape(p)}")
        if c.problems and c.left_off:
            err.print(f"  - and {c.left_off} more")
    for c in result.checks:
        if c.status is SKIP and c.group is Group.FIDELITY and c.name == "reconstruction" and not quiet and not result.unsupported:
            err.print(f"[yellow]Fidelity not measured:[/] {escape(c.detail)}")
    if result.provenance == "foreign" and not quiet and not result.unsupported:
        err.print(f"[yellow]{NOT_INT8.capitalize()}[/] ({NO_MARKS}): {escape(foreign_note(result))}")
    err.print(summary(result))


def foreign_note(result: VerifyResult) -> str:
    """How another tool's checkpoint was checked, in words."""
    said = "the checks of int8's own report, manifest and card are skipped and the code -128 is legal"
    if result.quick:
        return (f"{said}; with no manifest, a quick verify cannot tell changed bytes: run a full verify against the "
                "original (--against SOURCE), which compares every value with it")
    return f"{said}; every value was compared with the original's (within half a scale), without int8's scale rule"


def update_card(result: VerifyResult) -> Path:
    """Re-render the folder's README.md so its Fidelity section shows this result (saved beside it)."""
    from ..hub.card import rewrite_card
    from ..report import REPORT_NAME

    folder = result.folder
    if folder is None or not Path(folder, REPORT_NAME).is_file():
        raise Int8Error(
            f"--update-card needs the conversion report ({REPORT_NAME}) in the folder; {result.target} has none"
        )
    return rewrite_card(folder)
