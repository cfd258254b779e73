"""Files that a reader never sees half-written: the one atomic-write helper, JSON and JSON-lines.

A leaf: it imports nothing from empssl, so the checkpoint I/O, the run directory, the exports and the reports
can all use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class OutputError(RuntimeError):
    """An output path that cannot be written (a folder, no permission ...): reported in one line."""


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``: a process
    interrupted at any point (even killed) leaves either the previous file or none, never half of one.

    The temporary file is named ``.NAME.*.tmp``. Creates the output folder if needed; raises OutputError (one
    line) when it cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only remount, a quota: the previous file is untouched
        tmp.unlink(missing_ok=True)
        kept = "the previous one is kept" if path.exists() else "nothing was written"
        raise OutputError(f"cannot write {path}: {e.strerror or e}; {kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (:func:`write_atomic`)."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def check_writable_dir(path: str | Path, what: str = "output folder") -> None:
    """Raise OutputError (one line) unless files can be created in the folder ``path``, which need not exist yet.

    The nearest existing folder at or above ``path`` is probed with a temporary file, removed at once: a
    read-only mount, a missing permission or a path that is a file is found before long work starts, and
    nothing is left behind (``os.access`` would not do: it says yes to root on a read-only mount).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    _probe(path, f"{what} {path}")


def check_writable_file(path: str | Path, what: str = "output") -> None:
    """Raise OutputError (one line) unless the file ``path`` can be written (its folder probed as above)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    _probe(path.parent, f"{what} {path}")


def _probe(folder: Path, what: str) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot write {what}: {probe} is a file")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".empssl-probe.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {what}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(name)


def cut_jsonl(path: str | Path, step: int) -> None:
    """Keep the records of a JSON-lines file up to ``step`` (their ``"step"`` <= ``step``), atomically; a line
    torn by a kill goes too, and so does a record whose step is not a number. For a resumed run: the steps after
    its checkpoint are trained, and logged, again."""
    path = Path(path)
    if not path.exists():
        return
    records = read_jsonl(path)
    keep = [r for r in records if isinstance(r.get("step", 0), (int, float)) and r.get("step", 0) <= step]
    if len(keep) != len(records) or len(records) != len(_lines(path)):
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (metrics.jsonl, monitor.jsonl); a line that is not a JSON object (a torn
    last line, damage) is skipped. OutputError (one line) when the file cannot be read (a folder)."""
    out = []
    for line in _lines(Path(path)):
        try:
            record = parse_json(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _lines(path: Path) -> list[str]:
    try:  # empssl writes ASCII (json.dumps): a byte that is not UTF-8 is damage, and its line is skipped
        return path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise OutputError(f"cannot read {path}: {e.strerror or e}") from None


def parse_json(text: str | bytes) -> Any:
    """``json.loads``, with a document nested past Python's recursion limit a ValueError like any other that is
    not JSON (so that every reader refuses it as damaged)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json(path: str | Path) -> Any:
    """The JSON document in ``path``; ValueError when it is not one (not UTF-8, not JSON, nested too deeply)."""
    return parse_json(Path(path).read_bytes())
