"""What the user sees while variants compile and run: a live rich display on a terminal, plain
lines otherwise (CI logs, pipes), so a slow compile never looks like a hang."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    def start(self, index: int, total: int, name: str) -> None: ...

    def phase(self, text: str) -> None: ...

    def finish(self, summary: str) -> None: ...

    def close(self) -> None: ...


class PlainProgress:
    """One line per phase, with the seconds the previous phase took."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.prefix = ""
        self.since = time.perf_counter()

    def start(self, index: int, total: int, name: str) -> None:
        self.prefix = f"[{index}/{total}] {name}"
        self.since = time.perf_counter()

    def phase(self, text: str) -> None:
        print(
            f"{self.prefix}: {text} (t+{time.perf_counter() - self.since:.1f}s)",
            file=self.stream,
            flush=True,
        )

    def finish(self, summary: str) -> None:
        print(f"{self.prefix}: {summary}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """A spinner with the current variant and phase, and a bar over the variants."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as LiveBar

        self.console = Console(file=stream)
        self.bar = LiveBar(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.task: Any = None
        self.name = ""
        self.bar.start()

    def start(self, index: int, total: int, name: str) -> None:
        self.name = name
        if self.task is None:
            self.task = self.bar.add_task(name, total=total)
        self.bar.update(self.task, completed=index - 1, description=name)

    def phase(self, text: str) -> None:
        self.bar.update(self.task, description=f"{self.name}: {text}")

    def finish(self, summary: str) -> None:
        self.bar.advance(self.task)
        self.console.print(f"{self.name}: {summary}", markup=False)

    def close(self) -> None:
        self.bar.stop()


def make_progress(stream: TextIO | None = None) -> Progress:
    """Rich on a terminal when rich is installed, plain lines otherwise."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        try:
            return RichProgress(stream)
        except ImportError:
            pass
    return PlainProgress(stream)
