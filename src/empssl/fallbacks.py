"""Notes of the fast paths (CUDA-graphed probe, compiled step, second CUDA stream) that raised and fell back to
their plain twins: one line in the log and one entry in results.json's ``fallbacks``, so that whoever runs the code
sees that it ran slower, and why, instead of losing the run.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

# The open collections, innermost last: a note goes into every one of them, and is logged by the innermost's log.
_OPEN: list[tuple[list[dict[str, str]], Callable[[str], Any]]] = []


def fall_back(path: str, plain: str, error: BaseException) -> None:
    """Record that ``path`` (e.g. "compiled training step") raised ``error`` and ``plain`` runs instead."""
    why = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}".rstrip(": ")
    note = {"path": path, "fallback": plain, "why": why[:300]}
    line = f"{path} failed ({note['why']}); falling back to {plain}"
    for notes, _ in _OPEN:
        notes.append(note)
    if _OPEN:
        _OPEN[-1][1](line)
    else:
        print(f"empssl: {line}", file=sys.stderr)


@contextlib.contextmanager
def collecting(log: Callable[[str], Any] = print) -> Iterator[list[dict[str, str]]]:
    """The notes made until exit (a list that fills as they come), each logged once with ``log``."""
    notes: list[dict[str, str]] = []
    entry = (notes, log)
    _OPEN.append(entry)
    try:
        yield notes
    finally:
        del _OPEN[next(i for i, e in enumerate(_OPEN) if e is entry)]
