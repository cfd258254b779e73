"""The ``empssl`` command line: ``train``, ``eval``, ``ablate-patches``, ``ablate-test-patches``, ``tsne``,
``compare``, ``embed``, ``export`` and ``report``. Thin: parses flags into a Config and calls the library.

The settings flags are made from their declarations (:func:`empssl.config.setting`): one flag per Config field
and per method setting (:mod:`empssl.methods`), grouped by topic, with the declared help text and default."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .config import (
    Config,
    ConfigError,
    declared_settings_class,
    flag,
    flag_fields,
    load_preset,
    method_recipe,
    preset_names,
    settings_json,
    type_hints,
)
from .files import OutputError, check_writable_dir, check_writable_file
from .methods import method_names
from .version import __version__

# The settings of the commands that evaluate a checkpoint: its evaluation, where its data are read from, the device.
EVAL_FIELDS = [f.name for f in flag_fields(Config) if f.metadata["group"] == "evaluation"] + [
    "data", "data_dir", "image_size", "data_mode", "train_subset", "test_subset", "device", "precision"]
CHECKPOINT_HELP = "checkpoint.pt, or a run directory holding one"


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def comma_separated(convert: Callable[[str], Any], expected: str,
                    valid: Callable[[list[Any]], bool] = bool) -> Callable[[str], list[Any]]:
    """An argparse type: ``"a,b"`` -> [convert("a"), convert("b")]; a list that is empty, that ``convert`` refuses
    (ValueError) or that is not ``valid`` is argparse's one-line "expected comma-separated {expected}"."""

    def parse(text: str) -> list[Any]:
        try:
            values = [convert(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError:
            values = []
        if not values or not valid(values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {expected}, got {text!r}")
        return values

    return parse


parse_floats = comma_separated(float, "numbers")
parse_counts = comma_separated(int, "numbers >= 1", lambda counts: min(counts) >= 1)  # their users sort them


def parse_positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise ConfigError(f"{command}: {message}" if command else message)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(f"{v:g}" for v in value) or "none"
    return "none" if value is None else str(value)


def _flag_kwargs(name: str, hint: Any, meta: Any) -> dict[str, Any]:
    """argparse keywords of a setting from its annotation and declaration (the explicit bool parser for bools; a
    bare ``--flag`` means true, and ``on`` for the auto/on/off choices)."""
    choices = method_names() if name == "method" else meta["choices"]
    if choices:
        kw: dict[str, Any] = {"choices": choices, "metavar": "{" + ",".join(choices) + "}"}
        return {**kw, "nargs": "?", "const": "on"} if "on" in choices else kw
    if hint is bool:
        return {"type": parse_bool, "metavar": "BOOL", "nargs": "?", "const": True}
    if hint == tuple[float, ...]:
        return {"type": parse_floats, "metavar": "X,X,..."}
    if hint == tuple[float, float]:
        return {"type": float, "nargs": 2, "metavar": ("MIN", "MAX")}
    return {"type": float if hint == float | None else hint}


def _add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help=f"start from a preset: {', '.join(preset_names())}")
    parser.add_argument("--config", help="JSON file of config overrides (applied after --preset, before flags)")


def _add_config_flags(parser: argparse.ArgumentParser, names: Sequence[str], method_settings: bool = False,
                      inherited: Sequence[str] = ()) -> None:
    """``--no-progress`` and the flags of the Config fields ``names`` (and, with ``method_settings``, every
    method's own settings), in groups by topic; the command gets ``args.config_names``, the settings it has flags
    for. The settings ``inherited`` default to the checkpoint's."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    hints = type_hints(Config)
    fields = [(f, hints[f.name], f.metadata["group"]) for f in flag_fields(Config) if f.name in names]
    if method_settings:
        for m in method_names():
            settings = declared_settings_class(m)  # read from the source: --help imports no torch
            fields += [(f, type_hints(settings)[f.name], f"{m} (--method {m})") for f in flag_fields(settings)]
    groups: dict[str, Any] = {}
    added: list[str] = []
    for f, hint, group_name in fields:
        if f.name in added:  # a setting that several methods declare has one flag
            continue
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        shown = "the checkpoint's" if f.name in inherited else _shown(f.default)
        help_text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
        group.add_argument(flag(f.name), help=help_text, **_flag_kwargs(f.name, hint, f.metadata))
        added.append(f.name)
    parser.set_defaults(config_names=added)


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, by name."""
    given = {k: getattr(args, k) for k in args.config_names if getattr(args, k) is not None}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}  # --crop-scale MIN MAX: a tuple


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="empssl", description="EMP-SSL self-supervised pretraining and evaluation.")
    parser.add_argument("--version", action="version", version=f"empssl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="pretrain (or resume) a run, then evaluate it",
                       description=f"Pretrain with EMP-SSL (or --method {'|'.join(method_names()[1:])}) into --out; "
                                   "an existing --out is resumed. Several GPUs: torchrun --nproc-per-node N -m "
                                   "empssl.cli train ... (--batch-size is the global batch).")
    p.add_argument("--out", required=True, help="run directory (config.json, metrics.jsonl, checkpoint.pt, "
                                                "results.json); an existing one is resumed")
    _add_recipe_flags(p)
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    _add_config_flags(p, [f.name for f in flag_fields(Config)], method_settings=True)

    e = sub.add_parser("eval", help="evaluate a checkpoint (linear probe + kNN)",
                       description="Evaluate a checkpoint with its method's protocol (EMP-SSL: the bag of features; "
                                   "baselines: the whole image), or the one --eval-view / --eval-feature choose.")
    e.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    e.add_argument("--out", help="where to write the results JSON (default: results-eval.json beside the checkpoint)")
    _add_config_flags(e, EVAL_FIELDS)
    a = sub.add_parser("ablate-patches", help="train and evaluate the same recipe at several numbers of patches",
                       description="Patch-count ablation: one run per number of training patches in OUT/n{n}/ "
                                   "(finished runs are skipped, interrupted ones resumed), then OUT/ablation.json, "
                                   "ablation.md and ablation.png.")
    a.add_argument("--out", required=True, help="ablation folder (one run directory per count inside)")
    a.add_argument("--patches", type=parse_counts, default=[2, 5, 10, 20, 50, 100, 200],
                   help="comma-separated numbers of training patches (default: 2,5,10,20,50,100,200)")
    _add_recipe_flags(a)
    _add_config_flags(a, [f.name for f in flag_fields(Config) if f.name != "num_patches"], method_settings=True)

    t = sub.add_parser("ablate-test-patches", help="evaluate one checkpoint at several numbers of test patches",
                       description="Test-patch ablation: features of the largest count are extracted once and "
                                   "the bag of m patches averages the first m; writes test_patch_ablation.json/"
                                   ".md/.png beside the checkpoint.")
    t.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    t.add_argument("--counts", type=parse_counts, help="comma-separated numbers of test patches (default: 1, 4, 16, "
                                                       "64 ... up to the run's --test-patches, which is included)")
    t.add_argument("--out", help="folder for the outputs (default: the run directory)")
    _add_config_flags(t, [k for k in EVAL_FIELDS if k != "test_patches"])  # --counts instead

    s = sub.add_parser("tsne", help="t-SNE map of a checkpoint's test-set features, coloured by class",
                       description="2-D t-SNE (scikit-learn) of the bag-of-features of test images -> RUN/tsne.png.")
    s.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    s.add_argument("--max-points", type=int, default=5000, help="test images shown, class-balanced (default: 5000)")
    s.add_argument("--tsne-seed", type=int, default=0, help="t-SNE random state (default: 0)")
    s.add_argument("--out", help="PNG path (default: tsne.png in the run directory)")
    _add_config_flags(s, EVAL_FIELDS)

    c = sub.add_parser("compare", help="train several methods for the same wall-clock budget and report time to "
                                       "accuracy",
                       description="Time-to-accuracy comparison: each method's own recipe, calibrated on this "
                                   "device and sized to end at --budget-seconds of training, with the kNN monitor "
                                   "on; then each is evaluated with its own protocol and OUT/report.md compares "
                                   "them. The settings flags apply to every method alike, on top of its own "
                                   "recipe. Resumable: run the same command again.")
    c.add_argument("--out", required=True, help="comparison folder (one run directory per method inside)")
    names = comma_separated(str, f"methods from {','.join(method_names())}", lambda m: set(m) <= set(method_names()))
    c.add_argument("--methods", type=names, default=list(method_names()),
                   help=f"comma-separated methods (default: {','.join(method_names())})")
    c.add_argument("--budget-seconds", type=float,
                   help="training wall time per method, in seconds (required unless --smoke)")
    c.add_argument("--targets", type=parse_floats, default=(), metavar="PCT,PCT,...",
                   help="kNN accuracies (%%) to time besides 50,60,70,80")
    c.add_argument("--recipes", metavar="NAME",
                   help="each method M starts from the preset NAME-M instead of its own recipe (compare-demo: the "
                        "recipes scaled to the bundled demo data)")
    c.add_argument("--smoke", action="store_true",
                   help="toy size on the CPU with the bundled data (seconds per method): checks the command")
    # every method gets the same settings but --method (each keeps the rest of its own recipe)
    _add_config_flags(c, [f.name for f in flag_fields(Config) if f.name != "method"], method_settings=True)

    m = sub.add_parser("embed", help="features of every image of a folder, archive or dataset (.npz or .safetensors)",
                       description="One row per image of --data, in a stable order, with its relative file name "
                                   "and label (where the data has classes), under the checkpoint's evaluation "
                                   "protocol (EMP-SSL: the seeded bag of features).")
    m.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    m.add_argument("--data", required=True,
                   help="a folder of images, a class tree, an ImageFolder root (train/ val/ test/), Tiny ImageNet, "
                        "a .zip/.tar/.tar.gz of one, demo, tiny-imagenet, cifar10, cifar100, or a shard folder "
                        "(empssl shard; also s3:// or gs://BUCKET/PREFIX)")
    m.add_argument("--out", required=True, help="output file: .npz (features, names, labels, classes, protocol) "
                                                "or .safetensors")
    inherited = ["test_patches", "eval_view", "eval_feature", "eval_seed", "eval_batch_size", "device"]
    _add_config_flags(m, [*inherited, "image_size", "data_dir", "data_mode"], inherited=inherited)

    x = sub.add_parser("export", help="the trained backbone as a torchvision or timm state dict, or safetensors",
                       description="Write the backbone of a checkpoint for use elsewhere (README: Using the "
                                   "encoder).")
    x.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    x.add_argument("--out", required=True, help="output file")
    x.add_argument("--format", default="torchvision", choices=["torchvision", "timm", "safetensors"],
                   help="torchvision: loads into torchvision.models.resnet18() with strict=True after the CIFAR "
                        "stem is set (width 64); timm: the same into timm.create_model('resnet18', "
                        "num_classes=0); safetensors: any width, with arch/width/step metadata "
                        "(default: torchvision)")

    r = sub.add_parser("report", help="Markdown report with tables and plots of one or several runs",
                       description="Write report.md and PNG plots for run directories (or patch-ablation "
                                   "folders); several runs are compared side by side.")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or ablation folders")
    r.add_argument("--out", help="output folder (default: the run directory when there is one)")
    r.add_argument("--targets", type=parse_floats, default=(), metavar="PCT,PCT,...",
                   help="kNN accuracies (%%) to time besides 50,60,70,80 in the time-to-accuracy table")

    s = sub.add_parser("shard", help="write a folder, archive or ImageNet tree as LitData shards for streaming",
                       description="Write every image of SRC, in a seeded random order, as LitData shards of "
                                   "encoded image bytes + label + relative name: OUT/<split>/ per split and "
                                   "OUT/manifest.json (docs/DATA.md). An interrupted run continues where it stopped "
                                   "when run again.")
    s.add_argument("src", metavar="SRC", help="a folder of images, a class tree, an ImageFolder root (train/ val/ "
                                              "test/), Tiny ImageNet, a .zip/.tar/.tar.gz of one, demo, "
                                              "tiny-imagenet, or imagenet100:PATH / imagenet:PATH")
    s.add_argument("--out", required=True, help="the shard folder (new, empty, or an unfinished run to continue), or "
                                                "s3:// or gs://BUCKET/PREFIX (written under --data-dir, then uploaded)")
    s.add_argument("--max-side", type=parse_positive, metavar="N",
                   help="images whose longer side is larger are resized to N and re-encoded (JPEG quality 90); "
                        "the others are stored byte for byte (default: no limit, every image as it is)")
    s.add_argument("--workers", type=parse_positive, metavar="N",
                   help="processes writing shards (default: the usable CPU cores, at most 16)")
    s.add_argument("--shard-size", type=parse_positive, metavar="N",
                   help="images per shard (default: about 64 MB of the source's files per shard)")
    s.add_argument("--seed", type=int, metavar="N",
                   help="seed of the order each split (and each --append) is written in, so that LitData's chunk "
                        "shuffle gives batches of mixed classes (default: 0; an unfinished run's own)")
    s.add_argument("--data-dir", default="./data",
                   help="where tiny-imagenet and imagenet100 (without :PATH) are looked for (default: ./data)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--append", action="store_true",
                   help="add SRC's images to the train split of the complete shard folder OUT as new shards, "
                        "leaving its shards as they are; classes are mapped by name (docs/DATA.md: Appending)")

    return parser


def _base_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The overrides of ``--preset`` (or, for ``--method`` X without one, X's own preset) then ``--config``
    (flags come on top of these)."""
    from_file: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config file not found: {path}")
        from_file = settings_json(path.read_text(), f"--config {path}")
    method = getattr(args, "method", None) or from_file.get("method")
    # --preset "" starts from the defaults, even for a method with its own recipe
    base = load_preset(args.preset) if args.preset else method_recipe(method) if method and args.preset is None else {}
    return {**base, **from_file}


def cmd_ablate_patches(args: argparse.Namespace) -> None:
    explicit = {**_base_overrides(args), **_explicit(args)}
    explicit.pop("num_patches", None)
    cfg = Config.from_dict(explicit).validate()  # before torch loads (seconds), as train's
    from .experiments import ablate_patches

    ablate_patches(cfg, args.out, args.patches, explicit=explicit, progress=not args.no_progress)
    print(f"ablation written to {Path(args.out) / 'ablation.md'}")


def cmd_ablate_test_patches(args: argparse.Namespace) -> None:
    from .experiments import ablate_test_patches

    md = ablate_test_patches(args.checkpoint, args.counts, _explicit(args), out_dir=args.out,
                             progress=not args.no_progress)
    print(f"results written to {md}")


def cmd_tsne(args: argparse.Namespace) -> None:
    from .experiments import tsne_map

    path = tsne_map(args.checkpoint, _explicit(args), max_points=args.max_points, out=args.out,
                    seed=args.tsne_seed, progress=not args.no_progress)
    print(f"t-SNE map written to {path}")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    if args.out is None and len(args.runs) > 1:
        raise ConfigError("give --out DIR when reporting several runs")
    out = args.out or args.runs[0]
    check_writable_dir(out)
    print(f"report written to {write_report(args.runs, out, targets=args.targets)}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import SMOKE, SMOKE_BUDGET_SECONDS, compare

    overrides = _explicit(args)
    budget = args.budget_seconds
    if args.smoke:
        overrides = {**SMOKE, **overrides}
        budget = SMOKE_BUDGET_SECONDS if budget is None else budget
    if budget is None:
        raise ConfigError("--budget-seconds is required (the training wall time each method gets)")
    summary = compare(args.methods, args.out, budget, overrides, recipes=args.recipes, targets=args.targets,
                      progress=not args.no_progress)
    for row in summary["rows"]:
        print(f"{row['method']}: linear {row['linear_top1']:.1f}% | kNN {row['knn_top1']:.1f}% after "
              f"{row['train_seconds']:.0f} s ({row['epochs']:.2f} epochs)")
    print(f"comparison written to {Path(args.out) / 'report.md'}")


def cmd_embed(args: argparse.Namespace) -> None:
    from .embed import embed
    from .evaluate import view_label

    check_writable_file(args.out, "--out")  # before the features are computed
    s = embed(args.checkpoint, args.data, args.out, progress=not args.no_progress, **_explicit(args))
    how = view_label(s["view"], s["test_patches"]) + (f", seed {s['eval_seed']}" if s["view"] == "patches" else "")
    print(f"{s['n']} images x {s['dim']}-d {s['feature']} features ({how}) written to {s['out']}")


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_backbone

    check_writable_file(args.out, "--out")
    print(f"backbone ({args.format}) written to {export_backbone(args.checkpoint, args.out, args.format)}")


def cmd_train(args: argparse.Namespace) -> None:
    explicit = {**_base_overrides(args), **_explicit(args)}
    given = Config.from_dict(explicit).validate()  # a flag's error answers before torch loads (seconds)
    from .distributed import env_dist
    from .online import train_online
    from .rundir import finished, run_config
    from .train import train

    out = Path(args.out)
    cfg = run_config(out, given, explicit)
    if args.no_eval and finished(out, cfg):
        print(f"{out} is already trained to the end; nothing to do")
        return
    run = train_online if cfg.online else train  # online: one pass over a folder being filled
    results = run(cfg, out, progress=not args.no_progress, evaluate_at_end=not args.no_eval)
    # under torchrun, rank 0 reports; with evaluation, train() ends with the results file and where the time went
    if args.no_eval and not cfg.online and env_dist().is_main:
        print(f"trained {results['steps']} steps; checkpoint in {out / 'checkpoint.pt'}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate
    from .experiments import load_for_eval
    from .rundir import RunSession, run_dir_of

    out = Path(args.out) if args.out else run_dir_of(args.checkpoint) / "results-eval.json"
    check_writable_file(out, "--out")  # before the evaluation, not after it
    # not opened: no lock, so that a run's checkpoint can be evaluated while it trains on
    with RunSession(out.parent, print, trains=False) as session:
        t0 = time.perf_counter()
        model, cfg, ckpt, train_data, test_data, device = load_for_eval(
            args.checkpoint, _explicit(args), progress=not args.no_progress)
        session.add("data", time.perf_counter() - t0)
        results = evaluate(model, train_data, test_data, cfg, device, progress=not args.no_progress)
        session.evaluated(results)
        results.update(checkpoint=str(args.checkpoint), step=ckpt.get("step"), data=cfg.data)
        session.finish(results, int(ckpt.get("step") or 0), path=out)


def cmd_shard(args: argparse.Namespace) -> None:
    from .remote import is_remote, refuse_output, write_remote
    from .shard import append_shards, write_shards

    if args.append:
        refuse_output(args.out)  # an append replaces files in place, in an order a bucket cannot promise
    write = write_remote if is_remote(args.out) else append_shards if args.append else write_shards
    m = write(args.src, args.out, max_side=args.max_side, workers=args.workers, shard_size=args.shard_size,
              data_dir=args.data_dir, progress=not args.no_progress, seed=args.seed)
    splits = ", ".join(f"{name} {s.images:,} images in {len(s.shards)} shards" for name, s in m.splits.items())
    what = f"{m.root} with {args.src} appended" if args.append else m.source
    print(f"{what}: {splits}; {m.data['stored']:,} stored as they are, {m.data['reencoded']:,} re-encoded; "
          f"manifest {m.where}/manifest.json")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "ablate-patches": cmd_ablate_patches,
            "ablate-test-patches": cmd_ablate_test_patches, "tsne": cmd_tsne, "compare": cmd_compare,
            "embed": cmd_embed, "export": cmd_export, "report": cmd_report, "shard": cmd_shard}


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that are a user's mistake or bad data, each answered in one line. Their modules load torch
    (seconds): imported once an error other than a ConfigError is raised, not before a flag's error is answered."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .embed import EmbedError
    from .evaluate import EvalError
    from .export import ExportError
    from .probe import ProbeError
    from .report import ReportError
    from .train import TrainError

    return (DataError, CheckpointError, EvalError, ProbeError, TrainError, ReportError, EmbedError, ExportError,
            OutputError)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        usage = f"usage: empssl {{{','.join(COMMANDS)}}} [flags] (empssl COMMAND --help lists its flags)"
        if not argv:  # bare `empssl`: say how to use it
            raise ConfigError(f"no command given; {usage}")
        if argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
            raise ConfigError(f"unrecognized option {argv[0]} before the command; {usage}")
        args = build_parser().parse_args(argv)
        if args.command != "shard" and "://" in str(getattr(args, "out", None)):  # a URL: empssl.remote decides
            from .remote import refuse_output

            refuse_output(args.out)  # only empssl shard writes into an object store
        COMMANDS[args.command](args)
        return 0
    except KeyboardInterrupt as e:  # train() says what the run directory kept
        print(f"empssl: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    except OSError as e:  # the environment's refusal that no module turned into its own error (read-only, full)
        where = f"{e.filename}: " if e.filename else ""
        print(f"empssl: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not isinstance(e, ConfigError) and not isinstance(e, _user_errors()):
            raise
        print(f"empssl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
