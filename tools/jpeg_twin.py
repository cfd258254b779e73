"""Build the JPEG twin of the lossless 5,000-image CIFAR-10 subset (docs/RESULTS.md, "What JPEG costs").

For every ``cifar10-lossless-5k/<split>/<class>/NNNN.png`` of the lossless archive, takes the original JPEG bytes
of ``cifar10-jpeg75/<split>/<class>/NNNN.jpg`` from the JPEG archive (same relative name, not re-encoded) and
writes them as ``OUT/<split>/<class>/NNNN.jpg``: an ImageFolder tree with the same images, classes and order,
only the pixels differing. Checks that every name was found.

    python tools/jpeg_twin.py [--lossless ../shared/data/cifar10-lossless-5k.tar.gz] \
        [--jpeg ../shared/data/cifar10-jpeg75.tar.gz] [--out .data/cifar10-jpeg75-5k]
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
from pathlib import Path, PurePosixPath

SHARED = Path(os.environ.get("EMPSSL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def lossless_names(archive: Path) -> set[str]:
    """Relative names ``split/class/NNNN`` (no suffix) of the PNG files of the lossless archive."""
    with tarfile.open(archive, "r:gz") as tf:
        return {str(PurePosixPath(*PurePosixPath(m.name).parts[1:]).with_suffix(""))
                for m in tf if m.isfile() and m.name.endswith(".png")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lossless", type=Path, default=SHARED / "cifar10-lossless-5k.tar.gz",
                    help="the lossless subset's archive")
    ap.add_argument("--jpeg", type=Path, default=SHARED / "cifar10-jpeg75.tar.gz", help="the JPEG archive")
    ap.add_argument("--out", type=Path, default=Path(".data/cifar10-jpeg75-5k"), help="output ImageFolder root")
    args = ap.parse_args(argv)
    for path in (args.lossless, args.jpeg):
        if not path.is_file():
            print(f"jpeg_twin: {path} not found", file=sys.stderr)
            return 2
    wanted = lossless_names(args.lossless)
    written = 0
    with tarfile.open(args.jpeg, "r:gz") as tf:
        for m in tf:
            if not (m.isfile() and m.name.endswith(".jpg")):
                continue
            rel = PurePosixPath(*PurePosixPath(m.name).parts[1:])
            if str(rel.with_suffix("")) not in wanted:
                continue
            dest = args.out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            assert src is not None
            dest.write_bytes(src.read())
            written += 1
    if written != len(wanted):
        print(f"jpeg_twin: found {written} of the {len(wanted)} JPEG twins", file=sys.stderr)
        return 1
    print(f"{written} JPEG files written under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
