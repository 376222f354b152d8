"""What the commands draw: the two consoles, the conversion progress bar and byte sizes.

Errors, warnings, progress and tables go to stderr (`console`); what a script reads (URLs, the
verify table, generated text) to stdout (`out`).
"""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class RichProgress:
    """Bytes and tensors done, rate and time left, drawn with rich."""

    def __init__(self, description: str):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[tensors]} tensors"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._description = description
        self._task = None
        self._tensors = 0
        self._total_tensors = 0

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self._total_tensors = total_tensors
        self._progress.start()
        self._task = self._progress.add_task(self._description, total=total_bytes, tensors=f"0/{total_tensors}")

    def advance(self, nbytes: int, tensors: int = 0) -> None:
        self._tensors += tensors
        self._progress.update(self._task, advance=nbytes, tensors=f"{self._tensors}/{self._total_tensors}")

    def finish(self) -> None:
        self._progress.stop()


class StageProgress:
    """Stages of the layer-by-layer verify run done (embeddings, each block, the head), tokens/s and time left."""

    def __init__(self, description: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stage]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._description = description
        self._task = None
        self._tokens = 0
        self._started = 0.0

    def start(self, stages: int, tokens: int) -> None:
        import time

        self._tokens = tokens
        self._started = time.perf_counter()
        self._progress.start()
        self._task = self._progress.add_task(self._description, total=stages, stage="", rate="")

    def advance(self, stage: str) -> None:
        import time

        done = self._progress.tasks[0].completed + 1
        seconds = max(time.perf_counter() - self._started, 1e-9)
        self._progress.update(self._task, advance=1, stage=stage, rate=f"{self._tokens * done / seconds:,.0f} tok/s")

    def finish(self) -> None:
        self._progress.stop()


def size(n: int) -> str:
    """A byte count as people read it: 1.23 GB, 4.56 MB, 7.89 kB or 12 B."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def say(message: str) -> None:
    """A progress message of a long step, dimmed on stderr ("Loading the model...")."""
    console.print(f"[dim]{message}...[/]")
