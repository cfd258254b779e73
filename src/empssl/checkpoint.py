"""Checkpoint files: one dict (model, optimiser, step, RNG states, config), written atomically, read safely.

A leaf: rebuilding the model a run trained is :func:`empssl.rundir.load_checkpoint`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .files import write_atomic


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not match the requested architecture."""


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``
    (:func:`empssl.files.write_atomic`): a run killed mid-write leaves the previous checkpoint intact."""
    buffer = io.BytesIO()  # serialised in memory, so that a full disk is an OSError of the write, never torch's
    torch.save(obj, buffer)
    write_atomic(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


# The entries that empssl's readers take from a checkpoint, and their types ("rng.torch": ckpt["rng"]["torch"]).
# A file with another type there is damaged or not empssl's: one line naming it, not a TypeError mid-resume.
ENTRIES: dict[str, type | tuple[type, ...]] = {
    "model": dict, "optimizer": dict, "step": int, "finished": bool, "world_size": int, "config": dict,
    "rng": dict, "rng.torch": torch.Tensor, "rng.patches": torch.Tensor, "rng.device": (str, type(None)),
    "clock": dict, "clock.train_seconds": (int, float), "clock.monitor_seconds": (int, float),
    "metrics": (dict, type(None)), "metrics.sums": torch.Tensor, "metrics.n": int, "stream": dict,
    "source": (dict, type(None)), "source.step": int}
RESUMED = ("optimizer", "step", "rng", "rng.torch", "rng.patches")  # what a training run resumes from


def read_checkpoint(path: str | Path, require: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` (no pickled code is executed). Anything else (an empty or
    truncated file, another format, pickled objects, an entry of :data:`ENTRIES` of another type, a ``require``d
    entry missing) is a one-line CheckpointError, which never suggests ``weights_only=False``."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is not an empssl checkpoint (an empty file)")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # a torch zip archive, or torch's legacy pickle
        raise CheckpointError(f"{path} is not an empssl checkpoint (not a PyTorch file: it starts with {head!r})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects...
        text = str(e)
        if "Unsupported global" in text or "GLOBAL" in text:
            why = "it holds pickled Python objects, which empssl does not load"
        elif "weights_only" in text:  # torch's advice to load it unsafely is not repeated
            detail = next((line.split("error:", 1)[1].strip() for line in text.splitlines()
                           if "Unpickler error:" in line), "")
            why = f"damaged or not a checkpoint{': ' + detail if detail else ''}"
        else:
            why = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"{path} is not an empssl checkpoint ({why})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not an empssl checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    for key, kind in ENTRIES.items():
        value = _entry(ckpt, key)
        if value is _ABSENT:
            if key == "model" or key in require:
                raise CheckpointError(f"{path} is not an empssl checkpoint (no {key!r} entry)")
            continue
        if (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)  # True is an int too
                or (kind is int and isinstance(value, int) and value < (1 if key == "world_size" else 0))):
            shown = f"{value!r:.40}" if isinstance(value, (int, float, str)) else f"a {type(value).__name__}"
            raise CheckpointError(f"{path} is not an empssl checkpoint (its {key!r} is {shown})")
    return ckpt


_ABSENT = object()


def _entry(ckpt: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(ckpt, dict) or part not in ckpt:
            return _ABSENT
        ckpt = ckpt[part]
    return ckpt


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)``, turning a key or shape mismatch into a one-line CheckpointError."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
        parts = [f"{len(missing)} missing keys (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})"] if unexpected else []
        parts += [f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
                  for k in shapes[:1]]
        detail = "; ".join(parts) or str(e).splitlines()[0]
        raise CheckpointError(f"{what} does not match the architecture: {detail}") from None
