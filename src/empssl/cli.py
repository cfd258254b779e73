"""The ``empssl`` command line: ``train``, ``eval``. Thin: parses flags into a Config and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config, ConfigError, load_preset, preset_names

# (group, help) for every Config field exposed as a flag; defaults are shown from Config itself.
FLAGS: dict[str, tuple[str, str]] = {
    "data": ("data", "cifar10, cifar100, demo (bundled 5,000-image CIFAR-10 subset), or a path to an ImageFolder "
                     "root with train/ and test/ (or val/), or a .tar/.tar.gz/.zip of one"),
    "data_dir": ("data", "folder for torchvision datasets and the decoded-image cache"),
    "image_size": ("data", "resize images (shorter side + centre crop) to this size; 0 keeps their own size"),
    "train_subset": ("data", "use only the first N training images (class-balanced); 0 = all"),
    "test_subset": ("data", "use only the first N test images (class-balanced); 0 = all"),
    "num_patches": ("patches", "patches per image per step (20 official; 200 in the paper's best runs)"),
    "patch_size": ("patches", "patch side in pixels after resizing"),
    "crop_scale": ("patches", "crop area as a fraction of the image (min max)"),
    "crop_ratio": ("patches", "crop aspect ratio range (min max)"),
    "arch": ("model", "backbone architecture"),
    "width": ("model", "channels of the first ResNet stage (64 = standard ResNet-18)"),
    "hidden_dim": ("model", "pre-feature (evaluated representation) dimension"),
    "z_dim": ("model", "projector output dimension"),
    "eps": ("loss", "coding-rate distortion epsilon"),
    "invariance_weight": ("loss", "weight of the cosine invariance term (lambda)"),
    "epochs": ("optimisation", "training epochs (fractions allowed)"),
    "schedule_epochs": ("optimisation", "length of the cosine schedule in epochs; 0 = --epochs (use 2 with "
                                        "--epochs 1 for the official README's 1-epoch figure)"),
    "batch_size": ("optimisation", "images per step"),
    "lr": ("optimisation", "peak learning rate"),
    "momentum": ("optimisation", "SGD (Nesterov) momentum"),
    "weight_decay": ("optimisation", "weight decay (not applied to biases and norm parameters)"),
    "lars_eta": ("optimisation", "LARS trust coefficient"),
    "seed": ("run", "random seed (model init, batch order, patches)"),
    "device": ("run", "auto, cpu, cuda or cuda:N"),
    "precision": ("run", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32"),
    "channels_last": ("run", "channels_last memory format on CUDA"),
    "log_every": ("run", "steps between lines in metrics.jsonl"),
    "checkpoint_every": ("run", "steps between checkpoints (one is also written at every epoch end)"),
    "test_patches": ("evaluation", "augmented patches averaged per image (bag of features)"),
    "eval_feature": ("evaluation", "pre (4096-d pre-feature) or backbone (512-d)"),
    "eval_seed": ("evaluation", "seed of the test patches"),
    "eval_batch_size": ("evaluation", "patches per forward pass when extracting features; 0 = automatic"),
    "probe_epochs": ("evaluation", "linear-probe epochs"),
    "probe_lr": ("evaluation", "linear-probe learning rate"),
    "probe_momentum": ("evaluation", "linear-probe SGD momentum"),
    "probe_weight_decay": ("evaluation", "linear-probe weight decay"),
    "probe_batch_size": ("evaluation", "linear-probe batch size"),
    "probe_val_fraction": ("evaluation", "if > 0, select the probe epoch on this fraction of the training set "
                                         "(never on the test set); 0 reports the final epoch"),
    "knn_k": ("evaluation", "neighbours in the weighted kNN"),
    "knn_temperature": ("evaluation", "kNN temperature"),
    "compare_random_init": ("evaluation", "also evaluate the untrained encoder (same initialisation)"),
}
EVAL_FIELDS = [k for k, (g, _) in FLAGS.items() if g == "evaluation"] + [
    "data", "data_dir", "image_size", "train_subset", "test_subset", "device", "precision"]


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise ConfigError(f"{self.prog}: {message}")


def _add_config_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    defaults = Config()
    groups: dict[str, Any] = {}
    for name in names:
        group_name, help_text = FLAGS[name]
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        default = getattr(defaults, name)
        kw: dict[str, Any] = {"default": None, "help": f"{help_text} (default: {default})"}
        if isinstance(default, bool):
            kw.update(type=parse_bool, metavar="BOOL")
        elif isinstance(default, tuple):
            kw.update(type=float, nargs=2, metavar=("MIN", "MAX"))
        else:
            kw["type"] = type(default)
        group.add_argument("--" + name.replace("_", "-"), dest=name, **kw)


def _explicit(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    out = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    for key in ("crop_scale", "crop_ratio"):
        if key in out:
            out[key] = tuple(out[key])
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="empssl", description="EMP-SSL self-supervised pretraining and evaluation.")
    parser.add_argument("--version", action="version", version=f"empssl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="pretrain (or resume) a run, then evaluate it",
                       description="Pretrain with EMP-SSL into --out; an existing --out is resumed.")
    p.add_argument("--out", required=True, help="run directory (config.json, metrics.jsonl, checkpoint.pt, "
                                                "results.json); an existing one is resumed")
    p.add_argument("--preset", help=f"start from a preset: {', '.join(preset_names())}")
    p.add_argument("--config", help="JSON file of config overrides (applied after --preset, before flags)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_flags(p, list(FLAGS))

    e = sub.add_parser("eval", help="evaluate a checkpoint (linear probe + kNN on bag-of-features)",
                       description="Evaluate a checkpoint with the bag-of-features protocol.")
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt, or a run directory holding one")
    e.add_argument("--out", help="where to write the results JSON (default: results-eval.json beside the checkpoint)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_flags(e, EVAL_FIELDS)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from .train import finished, run_config, train

    base: dict[str, Any] = {}
    if args.preset:
        base.update(load_preset(args.preset))
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config file not found: {path}")
        try:
            base.update(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {path} is not valid JSON: {e}") from None
    explicit = {**base, **_explicit(args, list(FLAGS))}
    cfg = run_config(Path(args.out), Config.from_dict(explicit).validate(), explicit)
    out = Path(args.out)
    if finished(out) and args.no_eval:
        print(f"{out} is already trained to the end; nothing to do")
        return 0
    results = train(cfg, out, progress=not args.no_progress, evaluate_at_end=not args.no_eval)
    if not args.no_eval:
        print(f"results written to {out / 'results.json'}")
    else:
        print(f"trained {results['steps']} steps; checkpoint in {out / 'checkpoint.pt'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .data import load_data
    from .evaluate import evaluate
    from .train import resolve_device, write_results

    model, cfg, ckpt = load_checkpoint(args.checkpoint, _explicit(args, EVAL_FIELDS))
    device = resolve_device(cfg.device)
    train_data, test_data = load_data(cfg.data, cfg.data_dir, cfg.image_size, not args.no_progress)
    if cfg.train_subset:
        train_data = train_data.subset(cfg.train_subset)
    if cfg.test_subset:
        test_data = test_data.subset(cfg.test_subset)
    results = evaluate(model.to(device), train_data, test_data, cfg, device, progress=not args.no_progress)
    results.update(checkpoint=str(args.checkpoint), step=ckpt.get("step"), data=cfg.data)
    ckpt_path = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt_path if ckpt_path.is_dir() else ckpt_path.parent) / "results-eval.json"
    write_results(out, results)
    print(f"results written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError

    user_errors: tuple[type[BaseException], ...] = (ConfigError, DataError, CheckpointError)
    try:
        from .evaluate import EvalError
        from .train import TrainError

        user_errors += (EvalError, TrainError)
        args = build_parser().parse_args(argv)
        return {"train": cmd_train, "eval": cmd_eval}[args.command](args)
    except user_errors as e:
        print(f"empssl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"empssl: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
