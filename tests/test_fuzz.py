"""Fuzzing the readers of the files empssl reads back: manifest.json, index.json, config.json, trackers.json,
metrics.jsonl and checkpoint.pt. Each starts from a real file (a tiny run, a tiny shard folder) and is mutated:
values of other types, keys deleted or added, numbers out of range, names with path separators, truncated or
invalid bytes, an empty file, a folder in its place, deep nesting. The reader empssl calls either accepts it or
refuses it with a one-line user error naming the file; any other exception fails.

Fast tier: a few dozen cases per reader; slow tier (``-m slow``): 200 per reader, 1,200 in all. Both are
derandomized, so a run is reproducible.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hypothesis
import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from PIL import Image

from empssl.checkpoint import CheckpointError
from empssl.config import ConfigError
from empssl.data import DataError
from empssl.files import OutputError
from empssl.report.runs import is_run, loss_terms, read_run
from empssl.rundir import MetricsLog, RunSession, finished, load_checkpoint, run_config
from empssl.shard import write_shards
from empssl.stream import open_shards
from empssl.tracking import open_tracking
from empssl.train import TrainError, resume, setup, train

from .test_train import tiny_cfg

pytest.importorskip("litdata")

USER_ERRORS = (ConfigError, DataError, OutputError, CheckpointError, TrainError)  # what the CLI prints in one line
TIERS = [pytest.param(25, id="fast"), pytest.param(200, id="slow", marks=pytest.mark.slow)]
FOLDER, DEEP = object(), "\x00deep"  # a folder in the file's place; the marker a deeply nested value replaces

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([-1, 0, 2**63, 10**40])
           | st.floats() | st.text(max_size=12)
           | st.sampled_from(["../x", "/etc/passwd", "a/b", "..", "", "C:\\x", "x\x00y", DEEP]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=6)
TENSORS = st.sampled_from([torch.zeros(0), torch.zeros(3, dtype=torch.uint8), torch.tensor([1.5, float("nan")]),
                           torch.ones(2, 2, dtype=torch.int64)])


def check(read: Callable[[], Any], path: Path) -> None:
    """``read()`` returns, or raises a user error in one line that names ``path`` (its name or its folder)."""
    try:
        read()
    except USER_ERRORS as e:
        message = str(e)
        assert "\n" not in message and (path.name in message or str(path.parent) in message), message


def fuzz(examples: int, cases: Any, test: Callable[[Any], None]) -> None:
    """``test`` each of ``examples`` cases drawn from ``cases``, derandomized (the same cases every run)."""
    ran = []

    def counted(case: Case) -> None:
        ran.append(case)
        test(case)

    hypothesis.settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                        phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck))(
        hypothesis.given(cases)(counted))()
    assert len(ran) >= examples, f"{len(ran)} cases, not {examples}"


# --- mutations ------------------------------------------------------------------------------------------------


def _nodes(doc: Any, opaque: frozenset[str], at: tuple = ()) -> Iterator[tuple]:
    """The positions in ``doc`` (key paths), not inside the entries named in ``opaque``."""
    yield at
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        if key not in opaque:
            yield from _nodes(value, opaque, (*at, key))


def _get(doc: Any, at: tuple) -> Any:
    for key in at:
        doc = doc[key]
    return doc


class Case:
    """A file's new content (bytes, or :data:`FOLDER`), shown by how it was made (the bytes can be megabytes)."""

    def __init__(self, content: Any, how: str) -> None:
        self.content, self.how = content, how

    def __repr__(self) -> str:
        return self.how


@st.composite
def mutated(draw: Any, doc: Any, write: Callable[[Any], bytes], values: Any = JSON,
            opaque: frozenset[str] = frozenset()) -> Case:
    """``doc`` with one position replaced by ``values``, deleted, or given a new entry, written by ``write``."""
    doc = copy.deepcopy(doc)
    nodes = list(_nodes(doc, opaque))
    kind = draw(st.sampled_from(["replace", "delete", "add"]))
    at = draw(st.sampled_from([n for n in nodes if isinstance(_get(doc, n), (dict, list))] if kind == "add"
                              else nodes[1:] or nodes))
    value = draw(values) if kind != "delete" else None
    if kind == "add":
        node = _get(doc, at)
        if isinstance(node, dict):
            node[draw(st.text(max_size=8))] = value
        else:
            node.insert(draw(st.integers(0, len(node))), value)
    elif not at:
        doc = value
    elif kind == "replace":
        _get(doc, at[:-1])[at[-1]] = value
    else:
        del _get(doc, at[:-1])[at[-1]]
    return Case(write(doc), f"{kind} at {list(at)}" + (f": {value!r:.200}" if kind != "delete" else ""))


def _json_bytes(doc: Any) -> bytes:
    """JSON as Python writes it (NaN and Infinity too), the deep marker as 3,000 nested lists (past Python's
    recursion limit)."""
    return json.dumps(doc).replace(json.dumps(DEEP), "[" * 3_000 + "]" * 3_000).encode()


def _json_lines(records: Any) -> bytes:
    return b"".join(_json_bytes(r) + b"\n" for r in records) if isinstance(records, list) else _json_bytes(records)


@st.composite
def damaged(draw: Any, good: bytes) -> Case:
    """``good`` truncated, with invalid UTF-8 put in, emptied, nested too deep, or a folder in its place."""
    kind = draw(st.sampled_from(["truncated", "invalid utf-8", "empty", "deep", "folder"]))
    at = draw(st.integers(0, max(0, len(good) - 1)))
    return Case({"truncated": good[:at], "invalid utf-8": good[:at] + b"\xff\xc3(" + good[at:], "empty": b"",
                 "deep": b"[" * 3_000, "folder": FOLDER}[kind], f"{kind} at byte {at}")


def json_cases(path: Path, *, lines: bool = False) -> Any:
    """Mutations of the JSON (``lines``: JSON-lines) file ``path``: of its values, or of its bytes."""
    good = path.read_bytes()
    if lines:
        return mutated([json.loads(line) for line in good.decode().splitlines()], _json_lines) | damaged(good)
    return mutated(json.loads(good), _json_bytes) | damaged(good)


@contextmanager
def replaced(path: Path, case: Case) -> Iterator[None]:
    """``path`` holding the case's content inside the block, its own bytes again after it."""
    good, content = path.read_bytes(), case.content
    path.unlink()
    try:
        if content is FOLDER:
            (path / "inner").mkdir(parents=True)
        else:
            path.write_bytes(content)
        yield
    finally:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        path.write_bytes(good)


# --- the files, made once per module --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    """A real run of 2 steps."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    train(tiny_cfg(data_dir, epochs=1, train_subset=40, log_every=1, checkpoint_every=1), out, progress=False,
          log=lambda s: None, evaluate_at_end=False)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A real shard folder of a class tree: train/ (2 classes x 2 PNGs) and test/ (1 each)."""
    root = tmp_path_factory.mktemp("fuzz-shards")
    for split, n in (("train", 2), ("test", 1)):
        for c in ("ant", "bee"):
            for i in range(n):
                (root / "src" / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "src" / split / c / f"{i}.png")
    write_shards(str(root / "src"), root / "shards", workers=1, progress=False)
    return root / "shards"


# --- the readers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("examples", TIERS)
@pytest.mark.parametrize("name", ["manifest.json", "train/index.json"])
def test_shard_folder_readers(shards, name, examples):
    path = shards / name

    def test(case: Case) -> None:
        with replaced(path, case):
            check(lambda: open_shards(shards), path)

    fuzz(examples, json_cases(path), test)


@pytest.mark.parametrize("examples", TIERS)
def test_config_json_readers(run_dir, data_dir, examples):
    path, cfg = run_dir / "config.json", tiny_cfg(data_dir)

    def test(case: Case) -> None:
        with replaced(path, case):
            check(lambda: run_config(run_dir, cfg, {"device": "cpu"}), path)
            check(lambda: (is_run(run_dir), read_run(run_dir).method), path)

    fuzz(examples, json_cases(path), test)


@pytest.mark.parametrize("examples", TIERS)
def test_trackers_json_reader(run_dir, examples):
    pytest.importorskip("tensorboard")
    path = run_dir / "trackers.json"
    if not path.exists():  # the run's first session logged to TensorBoard
        open_tracking("tensorboard", run_dir, {}).close()

    def test(case: Case) -> None:
        with replaced(path, case):
            check(lambda: open_tracking("tensorboard", run_dir, {}, start_step=1).close(), path)

    fuzz(examples, json_cases(path), test)


@pytest.mark.parametrize("examples", TIERS)
def test_metrics_jsonl_readers(run_dir, examples):
    path = run_dir / "metrics.jsonl"

    def resumed() -> None:  # a resumed run cuts the file back to its checkpoint's step
        MetricsLog(path, ("loss",), torch.device("cpu"), start_step=1, steps_per_epoch=2, views_per_step=4).close()

    def test(case: Case) -> None:
        with replaced(path, case):
            check(resumed, path)
            check(lambda: loss_terms([read_run(run_dir)]), path)

    fuzz(examples, json_cases(path, lines=True), test)


@pytest.fixture(scope="module")
def session(tmp_path_factory, data_dir) -> Iterator[Any]:
    """A training session set up in a fresh folder, to resume from the fuzzed checkpoints."""
    with RunSession(tmp_path_factory.mktemp("fuzz") / "resumed", lambda s: None) as held:
        yield setup(tiny_cfg(data_dir, epochs=1, train_subset=40), held, None, False, lambda s: None)


@pytest.mark.parametrize("examples", TIERS)
def test_checkpoint_readers(run_dir, session, data_dir, examples):
    good = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    path, cfg = session.ckpt_path, tiny_cfg(data_dir)
    path.write_bytes((run_dir / "checkpoint.pt").read_bytes())

    def saved(ckpt: Any) -> bytes:
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        return buffer.getvalue()

    tree = mutated(good, saved, JSON | TENSORS, frozenset({"model", "optimizer"}))

    def test(case: Case) -> None:
        with replaced(path, case):
            check(lambda: load_checkpoint(path), path)
            rng = torch.get_rng_state()
            try:  # in train()'s order: the config checked, then the run resumed
                check(lambda: (finished(session.out), run_config(session.out, cfg, {"device": "cpu"}),
                               resume(session, lambda s: None)), path)
            finally:
                torch.set_rng_state(rng)

    fuzz(examples, tree | damaged(path.read_bytes()), test)
