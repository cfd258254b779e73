"""Where image bytes come from: a folder on disk or an archive read in place, and the rules that keep reading them
safe and bounded, the same for folders and archives (README.md, Data: "Bounded", "Only regular files"): only
regular files are read (the others are skipped and counted in :attr:`Tree.skipped`; an unreadable one is an
error), none larger than :data:`MAX_FILE_BYTES` (checked from the stat or the member's header, then by the read),
archives never extracted, no member outside the archive's root, hidden entries and ``__MACOSX/`` left out.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

from .images import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"})
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
# Text files of the Tiny ImageNet layout that are read (every other non-image file is skipped).
META_FILES = frozenset({"wnids.txt", "words.txt", "val_annotations.txt"})
# The largest image file read (on disk or unpacked from an archive). An uncompressed TIFF of the largest image
# that decoding accepts (MAX_IMAGE_PIXELS RGB) is 256 MiB; a JPEG or PNG that size is far beyond any photo.
MAX_FILE_BYTES = 256 * 2**20


def demo_archive() -> Path:
    """Path of the bundled demo archive (5,000 train + 1,000 test CIFAR-10 images, JPEG q75)."""
    return Path(str(resources.files("empssl") / "assets" / "cifar10-demo.tar.gz"))


@dataclass
class Tree:
    """An ImageFolder tree on disk or inside an archive, as relative POSIX paths (hidden entries left out)."""

    dirs: set[str]  # every folder, e.g. "cifar10-jpeg75/train/cat"
    files: dict[str, str | bytes]  # image path -> its absolute path on disk, or its bytes (archives)
    meta: dict[str, str | bytes] = field(default_factory=dict)  # Tiny ImageNet's text files (META_FILES), same
    # folders only: path -> (size, mtime_ns) of every file in ``files`` and ``meta``, what the cache is keyed by
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # image-named entries that are not regular files


def is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"  # macOS zips add __MACOSX/ with ._ resource forks


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _too_big(what: str, size: int) -> DataError:
    return DataError(f"{what} is {size:,} bytes, more than the {MAX_FILE_BYTES:,} an image file may have "
                     f"(empssl.data.sources.MAX_FILE_BYTES); leave it out of the data")


def read_file(path: str | bytes, what: str) -> bytes:
    """The bytes of the regular file ``path`` (bytes, an archive member's, as they are), at most
    :data:`MAX_FILE_BYTES`; ``what`` names it in errors. Opened non-blocking and checked with fstat, so that a FIFO
    or device put in its place after the scan is refused rather than waited on."""
    if isinstance(path, bytes):
        return path
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise DataError(f"cannot read {what}: {e.strerror or type(e).__name__}") from e
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"cannot read {what}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise _too_big(what, st.st_size)
        data = f.read(st.st_size + 1)  # a buffered read(n) allocates n bytes: ask for what stat promised
    if len(data) != st.st_size:
        raise DataError(f"cannot read {what}: it changed while being read")
    return data


def walk_folder(root: Path, tree: Tree | None = None, at: str = "") -> Tree:
    """The image files and Tiny ImageNet text files below ``root`` (paths, not bytes), with their stamps; added to
    ``tree``, under the folder ``at`` ("train/n01440764/") with its parents, when given."""
    tree = Tree(set(), {}) if tree is None else tree
    parents = at.split("/")[:-1]
    tree.dirs.update("/".join(parents[:i]) for i in range(1, len(parents) + 1))

    def unreadable(e: OSError) -> None:
        raise DataError(f"cannot read folder {e.filename}: {e.strerror or type(e).__name__}") from e

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        tree.dirs.update(at + prefix + d for d in dirnames)
        for name in filenames:
            if is_hidden(name) or not (is_image(name) or name in META_FILES):
                continue
            path, key = os.path.join(dirpath, name), at + prefix + name
            try:
                st = os.stat(path)  # follows symlinks: a link to a regular file counts as one
                regular = stat.S_ISREG(st.st_mode)
            except OSError:  # a symlink that leads nowhere (or the file vanished)
                regular = False
            if not regular:
                tree.skipped.append(key)
                continue
            if not os.access(path, os.R_OK):
                raise DataError(f"cannot read {prefix + name} in {root}: permission denied "
                                f"(make it readable, or move it out of the folder)")
            if st.st_size > MAX_FILE_BYTES:
                raise _too_big(f"{prefix + name} in {root}", st.st_size)
            (tree.files if is_image(name) else tree.meta)[key] = path
            tree.stamps[key] = (st.st_size, st.st_mtime_ns)
    return tree


def read_archive(archive: Path) -> Tree:
    """The image files (as bytes) and folders of ``archive``; DataError for members outside its root.

    Members are read into memory rather than extracted: writing tens of thousands of small files costs more than
    decoding them (0.7 ms vs 0.16 ms per CIFAR image on our machines). Their bytes (55 MB for CIFAR-10 as JPEG)
    are refused, from the members' headers, once they pass half the memory available: extract a larger archive.
    """
    tree = Tree(set(), {})
    available = memory_available()
    held = 0
    try:
        for name, kind, size, read in _members(archive):
            name = name.replace("\\", "/")
            parts = list(PurePosixPath(name).parts)  # "." and empty parts dropped
            if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                raise DataError(f"archive {archive} has a member outside its root: {name!r}")
            if not parts or any(is_hidden(p) for p in parts):
                continue
            path = "/".join(parts)
            wanted = kind != "dir" and (is_image(parts[-1]) or parts[-1] in META_FILES)
            if kind == "other":
                if wanted:
                    tree.skipped.append(path)
                continue
            # folders are often implied by their files only
            n_dirs = len(parts) if kind == "dir" else len(parts) - 1
            tree.dirs.update("/".join(parts[:i]) for i in range(1, n_dirs + 1))
            if not wanted:
                continue
            if size > MAX_FILE_BYTES:  # refused by its header, before a byte of it is unpacked
                raise _too_big(f"member {path} of {archive}", size)
            held += size
            if available is not None and 2 * held > available:  # many members, each under the cap
                raise DataError(f"archive {archive} holds more than {held / 2**20:,.0f} MiB of image files, over "
                                f"half the memory available ({available / 2**20:,.0f} MiB); extract it and pass "
                                f"the folder, whose files are read one at a time")
            data = read()
            if len(data) > MAX_FILE_BYTES:  # the header lied
                raise _too_big(f"member {path} of {archive}", len(data))
            (tree.files if is_image(parts[-1]) else tree.meta)[path] = data
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
            RuntimeError) as e:  # zipfile: an unsupported compression, an encrypted member
        # tarfile's messages can span lines
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise DataError(f"corrupt or unreadable archive {archive}: {type(e).__name__}: {detail}") from e
    return tree


def memory_available() -> int | None:
    """Bytes of memory available to new allocations (Linux: MemAvailable, capped by this process's cgroup v2
    limit), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    with contextlib.suppress(OSError, ValueError):  # a container's limit, when it is below what the host has
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    return avail


def _members(archive: Path) -> Iterator[tuple[str, str, int, Callable[[], bytes]]]:
    """(name, "dir" | "file" | "other", unpacked size from the header, capped reader) of every member."""
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                unix_type = stat.S_IFMT(info.external_attr >> 16)
                kind = ("dir" if info.is_dir() else
                        "other" if unix_type not in (0, stat.S_IFREG) else "file")  # 0: made on Windows

                def read(info: zipfile.ZipInfo = info) -> bytes:
                    with zf.open(info) as f:  # never asks for more than the header promised, plus one byte
                        return f.read(min(info.file_size, MAX_FILE_BYTES) + 1)

                yield info.filename, kind, info.file_size, read
    else:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:  # streaming: one forward pass over a compressed tar
                kind = "dir" if member.isdir() else "file" if member.isfile() else "other"

                def read_member(member: tarfile.TarInfo = member) -> bytes:
                    # a tar member holds exactly its header's size: reading it whole reads that many bytes
                    f = tf.extractfile(member)
                    assert f is not None  # regular members only
                    return f.read()

                yield member.name, kind, member.size, read_member
