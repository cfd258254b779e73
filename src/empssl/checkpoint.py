"""Checkpoint files: one dict (model, optimiser, step, RNG states, config), written atomically, read safely.

A leaf: it reads and writes dicts and loads a state dict into a model it is given. Rebuilding the model a
run trained is :func:`empssl.rundir.load_checkpoint`.
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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` (no pickled code is executed).

    Anything that is not an empssl checkpoint (an empty or truncated file, another format, a pickle of Python
    objects) is a one-line CheckpointError. It never suggests ``weights_only=False``: loading a file that way
    would run whatever code it holds.
    """
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
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not an empssl checkpoint (no 'model' entry)")
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
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        detail = "; ".join(parts) or str(e).splitlines()[0]
        raise CheckpointError(f"{what} does not match the architecture: {detail}") from None
