"""Build src/empssl/assets/cifar10-demo.tar.gz from the offline CIFAR-10 JPEG archive.

Takes the first 500 training and first 100 test images of every class (in the archive's file order, which is
CIFAR's own order) and repacks their original JPEG bytes, not re-encoded, as
``cifar10-demo/{train,test}/<class>/NNNN.jpg``. The output is byte-for-byte reproducible: members sorted,
fixed mtime/uid/gid/modes, USTAR headers, and a gzip header with mtime 0 and no file name.

    python tools/make_demo_subset.py [--source ARCHIVE] [--out ...]

``--source`` defaults to ``cifar10-jpeg75.tar.gz`` in ``$EMPSSL_SHARED_DATA``, else in ``../shared/data`` beside
the repository (where this project's machines keep it; tests/test_data.py looks in the same places).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import sys
import tarfile
from collections import defaultdict
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parent.parent
MTIME = 1577836800  # 2020-01-01 00:00 UTC, as in the source archive
SHARED_DATA = Path(os.environ.get("EMPSSL_SHARED_DATA") or REPO.parent / "shared" / "data")


def select(source: Path, per_split: dict[str, int]) -> dict[tuple[str, str, str], bytes]:
    """``{(split, class, file name): JPEG bytes}`` for the first ``per_split[split]`` files of each class."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    with tarfile.open(source, "r:gz") as tf:
        members = {}
        for m in tf:
            parts = PurePosixPath(m.name).parts
            # <root>/<split>/<class>/<file>
            if m.isfile() and len(parts) == 4 and parts[1] in per_split and parts[3].lower().endswith(".jpg"):
                found[(parts[1], parts[2])].append(parts[3])
                members[(parts[1], parts[2], parts[3])] = m
        chosen = [(split, cls, name) for (split, cls), names in found.items()
                  for name in sorted(names)[: per_split[split]]]
        short = {key: len(names) for key, names in found.items() if len(names) < per_split[key[0]]}
        if short:
            raise SystemExit(f"too few images in {source}: {short}")
        # Read in archive order so the gzip stream is only ever read forwards.
        chosen.sort(key=lambda k: members[k].offset)
        out = {}
        for key in chosen:
            f = tf.extractfile(members[key])
            assert f is not None
            out[key] = f.read()
    return out


def write(files: dict[tuple[str, str, str], bytes], out: Path, root: str) -> None:
    def info(name: str, size: int, is_dir: bool) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = size, MTIME, 0, 0, "", ""
        ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
        ti.mode = 0o755 if is_dir else 0o644
        return ti

    dirs = {root} | {f"{root}/{s}" for s, _, _ in files} | {f"{root}/{s}/{c}" for s, c, _ in files}
    entries: list[tuple[str, bytes | None]] = [(d, None) for d in dirs]
    entries += [(f"{root}/{s}/{c}/{n}", data) for (s, c, n), data in files.items()]
    entries.sort(key=lambda e: e[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in entries:
            if data is None:
                tf.addfile(info(name, 0, True))
            else:
                tf.addfile(info(name, len(data), False), io.BytesIO(data))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=SHARED_DATA / "cifar10-jpeg75.tar.gz",
                   help="the full CIFAR-10 JPEG ImageFolder archive (default: in $EMPSSL_SHARED_DATA or "
                        "../shared/data)")
    p.add_argument("--out", type=Path, default=REPO / "src/empssl/assets/cifar10-demo.tar.gz",
                   help="where to write the demo archive")
    p.add_argument("--train-per-class", type=int, default=500, help="training images kept per class")
    p.add_argument("--test-per-class", type=int, default=100, help="test images kept per class")
    args = p.parse_args(argv)
    files = select(args.source, {"train": args.train_per_class, "test": args.test_per_class})
    write(files, args.out, "cifar10-demo")
    data = args.out.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    print(f"wrote {args.out}: {len(files)} images, {len(data):,} bytes, sha256 {digest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
