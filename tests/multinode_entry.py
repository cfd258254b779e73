"""What tests/test_multinode.py's torchrun jobs run: ``empssl`` (its ``main``) with two test hooks set by the
environment, so that the job itself is the real command line.

- ``EMPSSL_TEST_ROWS=FOLDER``: each rank appends the names of the images of each step (one JSON list a line, in
  step order) to ``FOLDER/rank<RANK>.jsonl``, as the loop takes them.
- ``EMPSSL_TEST_PAUSE=1``: rank 0 stops after writing its first checkpoint and waits to be killed (the other ranks
  wait for it in their next collective), so that a test's kill lands after a checkpoint, whatever the machine's
  speed.
"""

import importlib
import json
import os
import sys
import time
from pathlib import Path

from empssl import stream
from empssl.cli import main

train_module = importlib.import_module("empssl.train")  # empssl.train is the function


def logged_rows(folder: Path, real_named):
    """``StreamBatches.named`` (``real_named``) that also appends each step's image names to
    ``folder/rank<RANK>.jsonl``."""

    def named(self):
        with (folder / f"rank{os.environ.get('RANK', '0')}.jsonl").open("a") as f:
            for images, names in real_named(self):
                f.write(json.dumps(names) + "\n")
                f.flush()
                yield images, names

    return named


def pause_after_first_checkpoint() -> None:
    real_save = train_module.save

    def save(run, *args, **kw):
        real_save(run, *args, **kw)
        while run.dist.is_main:
            time.sleep(1)

    train_module.save = save


if __name__ == "__main__":
    if os.environ.get("EMPSSL_TEST_ROWS"):
        stream.StreamBatches.named = logged_rows(Path(os.environ["EMPSSL_TEST_ROWS"]), stream.StreamBatches.named)
    if os.environ.get("EMPSSL_TEST_PAUSE"):
        pause_after_first_checkpoint()
    sys.exit(main())
