"""Checkpoints: one dict (model, optimiser, step, RNG states, config), written atomically, loaded safely."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError
from .models import EMPSSLModel


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not match the requested architecture."""


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``: a run killed
    mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` (no pickled code is executed)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects...
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not an empssl checkpoint (no 'model' entry)")
    return ckpt


def build_model(cfg: Config) -> EMPSSLModel:
    return EMPSSLModel(cfg.arch, cfg.width, cfg.hidden_dim, cfg.z_dim)


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


def load_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[EMPSSLModel, Config, dict]:
    """Rebuild the model a checkpoint was trained with (its saved config, updated by ``overrides``) and load
    its weights strictly. Returns (model on CPU, config, raw checkpoint dict)."""
    ckpt = read_checkpoint(path)
    try:
        cfg = Config.from_dict({**ckpt.get("config", {}), **(overrides or {})}).validate()
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unusable config: {e}") from None
    model = build_model(cfg)
    load_model_state(model, ckpt["model"], f"checkpoint {path} ({cfg.arch}, width {cfg.width}, "
                                           f"hidden {cfg.hidden_dim}, z {cfg.z_dim})")
    return model, cfg, ckpt
