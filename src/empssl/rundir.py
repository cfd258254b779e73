"""The run directory: its saved config, what may change on resume, whether it is finished, and its JSON files.

A run directory holds config.json (the resolved config and the empssl version), metrics.jsonl, checkpoint.pt
(model, optimiser, step, RNG states, config), monitor.jsonl with --eval-every, and results.json. Training,
evaluation, the experiments and the CLI share these rules (and :func:`config_data`, the images a run's config
names); none of them needs the trainer to read a run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import Config, ConfigError, flag

if TYPE_CHECKING:
    from .data import ImageData

# Keys that may differ between a run directory's saved config and the command that resumes it: they change
# where things are read or how often they are written, or the evaluation, never the trained weights.
RESUMABLE_CHANGES = frozenset({
    "device", "data_dir", "log_every", "checkpoint_every", "log",  # where and how often
    "test_patches", "eval_view", "eval_feature", "eval_seed", "eval_batch_size", "probe_epochs", "probe_lr",
    "probe_lrs", "probe_momentum", "probe_weight_decay", "probe_batch_size", "probe_val_fraction", "knn_k",
    "knn_temperature", "compare_random_init", "extra",  # evaluation
    "eval_every", "monitor_patches", "monitor_bank", "monitor_test",  # monitoring
    "grad_checkpointing", "compile",  # speed: exact or numerically equivalent
})


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory of a checkpoint path (a run directory stands for its own checkpoint.pt)."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def saved_config(out_dir: str | Path) -> Config | None:
    """The config saved in ``out_dir/config.json``, or None when there is none."""
    path = Path(out_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        return Config.from_dict(json.loads(path.read_text())["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not an empssl config ({type(e).__name__}: {e})") from None


def run_config(out_dir: str | Path, cfg: Config, explicit: dict[str, Any]) -> Config:
    """The config to use for ``out_dir``: ``cfg`` for a new run; for an existing run its saved config with the
    explicitly given settings applied, refusing those that would change the weights being resumed."""
    saved = saved_config(out_dir)
    if saved is None:
        return cfg
    changed = [k for k, v in explicit.items() if k not in RESUMABLE_CHANGES and getattr(saved, k) != v]
    if changed:
        k = changed[0]
        raise ConfigError(f"{out_dir} holds a run with {k}={getattr(saved, k)!r}, not {explicit[k]!r}; "
                          f"drop {flag(k)} to resume it or choose a new --out")
    return saved.replace(**{k: v for k, v in explicit.items() if k in RESUMABLE_CHANGES}).validate()


def write_config(out_dir: str | Path, cfg: Config) -> None:
    write_json(Path(out_dir) / "config.json", {"version": __version__, "config": cfg.to_dict()})


class OutputError(RuntimeError):
    """An output path that cannot be written (a folder, no permission ...): reported in one line."""


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``: a process
    interrupted at any point (even killed) leaves either the previous file or none, never half of one.

    Creates the output folder if needed; raises OutputError (one line) when it cannot be created or written.
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (:func:`write_atomic`): a reader never sees half a file."""
    text = json.dumps(obj, indent=2) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


def config_data(cfg: Config, progress: bool = True, data: tuple[ImageData, ImageData] | None = None
                ) -> tuple[ImageData, ImageData]:
    """(train, test) of ``cfg.data`` (or ``data`` as given), cut to ``cfg.train_subset`` / ``cfg.test_subset``."""
    from .data import load_data

    train, test = data if data is not None else load_data(cfg.data, cfg.data_dir, cfg.image_size, progress)
    if cfg.train_subset:
        train = train.subset(cfg.train_subset)
    if cfg.test_subset:
        test = test.subset(cfg.test_subset)
    return train, test


def finished(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a checkpoint trained to the end of its schedule."""
    from .checkpoint import read_checkpoint

    p = Path(out_dir) / "checkpoint.pt"
    return p.exists() and bool(read_checkpoint(p).get("finished", False))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (metrics.jsonl, monitor.jsonl); a torn last line is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
