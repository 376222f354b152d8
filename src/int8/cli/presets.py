"""`int8 presets`: the table of `int8.presets.all_presets()`."""

from rich.table import Table

from .display import out


def presets() -> None:
    """List the model presets that `int8 convert NAME` accepts."""
    from ..presets import all_presets

    table = Table(title="int8 presets")
    table.add_column("preset", no_wrap=True)
    table.add_column("Hub repo", overflow="fold", min_width=29)  # a repo id is copied from here: wrap it, never cut it
    for col in ("params", "dtype"):
        table.add_column(col, no_wrap=True)
    table.add_column("license", overflow="fold")
    for p in all_presets().values():
        table.add_row(p.name, p.repo, p.parameters, p.dtype, p.card.license or "")
    out.print(table)
