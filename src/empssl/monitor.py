"""Time-to-accuracy during training: a cheap kNN check every few steps.

Every ``cfg.eval_every`` steps (an integer number of steps, or a fraction of an epoch when < 1) the encoder's
features (the run's evaluation view: for EMP-SSL a bag of ``cfg.monitor_patches`` patches) of a fixed
class-balanced subset of the test set are classified by a weighted kNN against a fixed class-balanced subset of
the training set, and one line is appended to ``RUN/monitor.jsonl``::

    {"step", "epoch", "elapsed_s", "train_s", "patches_seen", "images_seen", "knn_top1", "monitor_patches",
     "monitor_s", "n_bank", "n_test"}

(no ``epoch`` without epochs: the online mode). ``train_s`` is the training wall time excluding every check,
``elapsed_s`` includes them: the run's clock (:meth:`empssl.rundir.RunSession.clock`, to which each check reports
its seconds), which goes on across resumes. The check does not disturb training: it uses an eval-mode copy of the
model (:func:`empssl.models.inference_copy`), patches from generators seeded by ``cfg.eval_seed`` and no
gradient, so a run with and without monitoring ends with bitwise-identical weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config
from .devices import synchronize
from .distributed import SINGLE, Dist
from .evaluate import Split, image_features, knn_predict, split_images
from .files import cut_jsonl
from .rundir import RunSession


def monitor_interval(eval_every: float, steps_per_epoch: int) -> int:
    """Steps between monitor evaluations: ``eval_every`` steps when >= 1, that fraction of an epoch when
    in (0, 1) (at least one step), 0 (never) when 0."""
    if eval_every <= 0:
        return 0
    if eval_every >= 1:
        return int(eval_every)
    return max(1, round(eval_every * steps_per_epoch))


class Monitor:
    """The kNN check, when ``cfg.eval_every > 0``, timed on ``session``'s clock (a check outside a run: its own).

    The first ``cfg.monitor_bank`` / ``cfg.monitor_test`` images of ``train`` / ``test`` are the bank and the
    queries. ``patches_per_step`` counts all processes; records after ``start_step`` (an interrupted session's)
    are dropped. Under torchrun every rank computes its share of the features; rank 0 writes, also to the session's
    trackers (``--log``).
    """

    def __init__(self, cfg: Config, train: Split, test: Split, device: torch.device, out_dir: Path, *,
                 steps_per_epoch: int, total_steps: int, patches_per_step: int, start_step: int = 0,
                 session: RunSession | None = None, dist: Dist = SINGLE) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.steps_per_epoch, self.total_steps, self.patches_per_step = steps_per_epoch, total_steps, patches_per_step
        self.start_step, self.dist = start_step, dist
        self.interval = monitor_interval(cfg.eval_every, steps_per_epoch)
        self.session = session or RunSession(out_dir, print, trains=False)
        self.path = Path(out_dir) / "monitor.jsonl"
        if not self.interval:
            return
        self.bank, self.query = train.subset(cfg.monitor_bank), test.subset(cfg.monitor_test)
        self.bank_labels = self.bank.labels.to(device)
        if dist.is_main:
            cut_jsonl(self.path, start_step)

    def start(self, model: nn.Module) -> None:
        """Start the run's clock; on a fresh run, also record the untrained encoder (step 0)."""
        synchronize(self.device)
        self.session.started = time.perf_counter()
        if self.interval and self.start_step == 0:
            self.evaluate(model, 0)

    def after_step(self, model: nn.Module, step: int) -> float:
        """Evaluate if ``step`` is due (every ``interval`` steps and the last one); return the seconds spent."""
        if not self.interval or (step % self.interval and step != self.total_steps):
            return 0.0
        return self.evaluate(model, step)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> float:
        """Run the kNN check of ``model`` at ``step`` now; return the seconds it took."""
        synchronize(self.device)
        t = time.perf_counter()
        clock = self.session.clock()
        cfg = self.cfg
        # the run's evaluation view and feature (a bag of monitor_patches patches for EMP-SSL)
        bank, query = (image_features(model, split_images(s), cfg, self.device, n_patches=cfg.monitor_patches,
                                      dist=self.dist) for s in (self.bank, self.query))
        pred = knn_predict(bank, self.bank_labels, query, len(self.bank.classes), k=min(cfg.knn_k, len(self.bank)),
                           temperature=cfg.knn_temperature)
        top1 = (pred.cpu() == self.query.labels).double().mean().item() * 100  # the check's one host sync
        spent = time.perf_counter() - t
        self.session.add("monitor", spent)
        rec: dict[str, Any] = {
            "step": step, **({"epoch": round(step / self.steps_per_epoch, 4)} if self.steps_per_epoch else {}),
            "elapsed_s": clock["elapsed_seconds"], "train_s": clock["train_seconds"],
            "patches_seen": step * self.patches_per_step, "images_seen": step * cfg.batch_size, "knn_top1": top1,
            "monitor_patches": cfg.monitor_patches, "monitor_s": spent,
            "n_bank": len(self.bank), "n_test": len(self.query),
        }
        if self.dist.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            self.session.tracker.log_scalars(rec, step=step, wall_time=time.time(), prefix="monitor/")
        return spent
