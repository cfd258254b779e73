"""Files that a reader never sees half-written: the one atomic-write helper, JSON and JSON-lines, and the one
writer lock. A leaf: it imports nothing from empssl, so that every writer can use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

try:
    import fcntl
except ImportError:  # Windows: no advisory locks there; one writer at a time is then the user's job
    fcntl = None  # type: ignore[assignment]


class OutputError(RuntimeError):
    """An output path that cannot be written (a folder, no permission ...): reported in one line."""


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file ``.NAME.*.tmp`` beside ``path``, fsync it and rename it over ``path``:
    a process killed at any point leaves the previous file or none, never half of one. Creates the folder if needed;
    OutputError (one line) when it cannot be written."""
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
    """OutputError (one line) unless files can be created in the folder ``path``, which need not exist yet: its
    nearest existing folder is probed with a temporary file (``os.access`` says yes to root on a read-only mount)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    _probe(path, f"{what} {path}")


def check_writable_file(path: str | Path, what: str = "output") -> None:
    """OutputError (one line) unless the file ``path`` can be written (its folder probed as above)."""
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
    """Keep the records of a JSON-lines file whose ``"step"`` is a number <= ``step``, atomically (a torn line goes
    too): a resumed run trains, and logs, the steps after its checkpoint again."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if isinstance(r.get("step", 0), (int, float)) and r.get("step", 0) <= step]
    if len(keep) != len(_lines(path)):  # a record cut, or a line that holds none
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, skipping a line that is not a JSON object (torn, damaged); OutputError
    (one line) when the file cannot be read."""
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
    """``json.loads``, a document nested past Python's recursion limit a ValueError like any other non-JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json(path: str | Path) -> Any:
    """The JSON document in ``path``; ValueError when it is not one (not UTF-8, not JSON, nested too deeply)."""
    return parse_json(Path(path).read_bytes())


class WriterLock:
    """One writer at a time (``with`` block): an exclusive lock on the file ``path``, which holds the writer's PID
    and is removed on release; a file a killed writer left is taken over with a note. A second writer gets a
    one-line OutputError, ``busy(holder)``, with the holder's PID as the kernel knows it.

    A record lock (``lockf``), not ``flock``, which forked DataLoader workers would share and keep after their
    parent is killed; as closing any descriptor of the file drops it, a second lock by this process is refused
    before the file is opened. ``path`` is never followed: a lock file that is not a plain file is refused.
    """

    _held: ClassVar[set[tuple[int, int]]] = set()  # (device, inode) of the lock files this process holds

    def __init__(self, path: Path, busy: Callable[[str], str], log: Callable[[str], None]) -> None:
        self.path, self.busy, self.log = path, busy, log
        self.fd: int | None = None
        self.key = (0, 0)

    def __enter__(self) -> WriterLock:
        if fcntl is None:
            return self
        while True:
            fd = self._open()
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _holder(fd)
                os.close(fd)
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise OutputError(f"cannot lock {self.path}: {e.strerror or e}") from None
                raise OutputError(self.busy(f"another empssl process{f' (PID {holder})' if holder else ''}")
                                  ) from None
            st = os.fstat(fd)
            # a holder that released between our open and lockf removed the file: lock the new one
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(st, os.lstat(self.path)):
                    break
            os.close(fd)
        if os.pread(fd, 1, 0):  # a clean release removes the file: its writer was killed
            self.log(f"{self.path} was left by a writer that was killed (or copied with its folder); lock taken "
                     f"over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd, self.key = fd, (st.st_dev, st.st_ino)
        WriterLock._held.add(self.key)
        return self

    def _open(self) -> int:
        """A descriptor of ``path`` (created if missing), checked to be a plain file this process does not hold
        before opening it (a device is not even opened) and after (replaced meanwhile)."""
        with contextlib.suppress(FileNotFoundError):
            self._check(os.lstat(self.path))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write {self.path.parent}: {e.strerror or e}") from None
        try:
            self._check(os.fstat(fd))
        except OutputError:
            os.close(fd)
            raise
        return fd

    def _check(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OutputError(f"{self.path} is not a plain file (a link, a folder or a device, e.g. copied in with "
                              f"its folder); empssl leaves it as it is: remove it and run again")
        if (st.st_dev, st.st_ino) in WriterLock._held:
            raise OutputError(self.busy(f"this process (PID {os.getpid()})"))

    def __exit__(self, *exc: Any) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # (a folder made read-only meanwhile keeps it: the next writer takes over)
            self.path.unlink(missing_ok=True)  # before the unlock, so that no one locks a file that is going away
        WriterLock._held.discard(self.key)
        os.close(self.fd)
        self.fd = None


def _holder(fd: int) -> int | None:
    """The PID holding a lock on ``fd``'s file (F_GETLK, in Linux's ``struct flock`` layout), or None where the
    kernel cannot tell (another PID namespace, another system, released)."""
    if fcntl is None or not sys.platform.startswith("linux"):
        return None
    layout = "hhqqi"  # l_type, l_whence, l_start, l_len (0: to the end), l_pid
    try:
        got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return None
    pid = struct.unpack(layout, got)[4]
    return pid if pid > 0 else None
