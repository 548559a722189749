"""The ``mocov3`` command: a thin layer over the library.

Every user error (bad config, missing data, unusable checkpoint) ends with one ``error:`` line on
stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("mocov3")


def _launch_rank() -> int:
    """This process's rank as torchrun announces it (before the process group exists)."""
    import os

    return int(os.environ.get("RANK", "0"))


def _setup_logging(output_dir: Path | None = None, quiet: bool = False) -> None:
    level = logging.INFO if _launch_rank() == 0 and not quiet else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output_dir is not None and _launch_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output_dir / "log.txt"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


def _pretrain_parser(sub) -> None:
    from .config import describe_keys

    p = sub.add_parser(
        "pretrain", help="self-supervised pretraining",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain a backbone with MoCo v3. Re-running the command on an existing output "
                    "folder resumes it.",
        epilog=describe_keys())
    p.add_argument("--config", help="YAML recipe (see configs/); default: the built-in defaults, or the "
                                    "config of the checkpoint being resumed")
    p.add_argument("--data", required=True,
                   help="image folder (one subfolder per class) or cifar10 / cifar100 (downloaded once)")
    p.add_argument("--eval-data", help="labelled test set for the kNN monitor (bank: --data), e.g. cifar10:test")
    p.add_argument("--output-dir", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints")
    p.add_argument("--resume", help="checkpoint to resume from (default: OUTPUT_DIR/checkpoint.pt if present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=10 base_lr=1e-4")


def _eval_parser(sub, name: str, help: str, override_example: str) -> argparse.ArgumentParser:
    """Arguments shared by the evaluation commands (a checkpoint, a labelled train and test set)."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--train-data", required=True, help="labelled training set / kNN bank (folder or cifar10 ...)")
    p.add_argument("--test-data", required=True, help="labelled test set (image folder or cifar10:test ...)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {override_example}")
    return p


def _knn_parser(sub) -> None:
    p = _eval_parser(sub, "knn", "weighted kNN accuracy of a checkpoint's backbone",
                     "eval.knn_bank_size=10000 train.precision=fp32")
    p.add_argument("--k", help="neighbours, one or a comma list (e.g. 10,20,200); the first is reported as top1")
    p.add_argument("--temperature", help="temperature(s), comma list (default eval.knn_temperature)")


def _linear_parser(sub) -> None:
    p = _eval_parser(sub, "linear", "linear probe on the frozen backbone (PAPER.md §8)",
                     "linear.epochs=100 linear.lr_sweep=[0.1,1.0] linear.bn=false")
    p.add_argument("--fast", action="store_true",
                   help="train on cached features (no augmentation) with an lr sweep chosen on a held-out split")
    p.add_argument("--output-dir", help="folder for config.yaml and result.json")


def _finetune_parser(sub) -> None:
    p = _eval_parser(sub, "finetune", "end-to-end fine-tuning of a checkpoint's backbone (or from scratch)",
                     "finetune.epochs=10 finetune.batch_size=256 finetune.layer_decay=0.65")
    p.add_argument("--output-dir", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoint.pt")
    p.add_argument("--from-scratch", action="store_true",
                   help="same architecture from random init (the checkpoint only supplies the architecture)")


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of pretraining runs (resumable) and summarize them")
    p.add_argument("--config", help="YAML recipe shared by every run")
    p.add_argument("--data", required=True)
    p.add_argument("--eval-data", help="test set for the kNN monitor")
    p.add_argument("--output-dir", required=True, help="one sub-folder per run, plus summary.json / summary.md")
    p.add_argument("--grid", nargs="+", required=True, metavar="key=v1,v2", help="e.g. base_lr=1e-4,5e-4")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides shared by every run")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="PNG figures and a Markdown page from run folders (needs matplotlib)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--output", required=True, help="folder for the figures and report.md")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="backbone as safetensors with timm names, config.json and a model card")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True, help="folder to write")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mocov3", description="MoCo v3 self-supervised pretraining of ViTs")
    parser.add_argument("--version", action="version", version=f"mocov3 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _pretrain_parser(sub)
    _knn_parser(sub)
    _linear_parser(sub)
    _finetune_parser(sub)
    _sweep_parser(sub)
    _report_parser(sub)
    _export_parser(sub)
    return parser


def cmd_pretrain(args) -> int:
    from .config import load_config
    from .train.checkpoint import load_checkpoint
    from .train.loop import CHECKPOINT_NAME, pretrain

    out = Path(args.output_dir)
    base = None
    ckpt = Path(args.resume) if args.resume else out / CHECKPOINT_NAME
    if not args.config and ckpt.is_file():
        base = load_checkpoint(ckpt)["config"]  # resuming without a recipe: the run's own config
        base["train"]["max_steps"] = 0  # a per-invocation limit, not part of the run's recipe
    cfg = load_config(args.config, args.overrides, base=base)
    _setup_logging(out)
    res = pretrain(cfg, args.data, out, eval_spec=args.eval_data, resume=args.resume,
                   progress=not args.no_progress)
    if res.interrupted_by:
        log.warning("stopped at step %d; run the same command again to resume", res.step)
        return 128 + res.interrupted_by
    msg = {"step": res.step, "finished": res.finished, "output_dir": str(out)}
    if res.last_knn:
        msg.update({"knn_top1": res.last_knn["top1"], "knn_top5": res.last_knn["top5"]})
    if _launch_rank() == 0:
        print(json.dumps(msg))
    return 0


def _number_list(text: str, kind):
    from .config import ConfigError

    try:
        vals = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected a comma-separated list of numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise ConfigError(f"expected positive numbers, got {text!r}")
    return vals


def _eval_features(args, cfg, backbone, device, precision, sets) -> list:
    """Raw features of each (dataset, limit) in ``sets``, through the on-disk feature cache unless
    ``--no-cache``: [(features [N, D], labels [N]), ...]."""
    from .data.cifar import resolve_cache_dir
    from .eval.knn import cached_features, feature_cache_key

    cache = resolve_cache_dir(cfg.data) / "features"
    out = []
    for data, limit in sets:
        key = None if args.no_cache else cache / (
            feature_cache_key(Path(args.checkpoint), data, cfg.data, precision, limit) + ".pt")
        out.append(cached_features(backbone, data, cfg.data, device, cfg.eval.batch_size, precision, limit, key))
    return out


def cmd_knn(args) -> int:
    import torch.nn.functional as F

    from .eval.knn import knn_grid

    _setup_logging()
    cfg, ckpt, backbone, device, precision, bank, test = _load_for_eval(args)
    ks = _number_list(args.k, int) if args.k else [cfg.eval.knn_k]
    temps = _number_list(args.temperature, float) if args.temperature else [cfg.eval.knn_temperature]
    (fb, lb), (ft, lt) = _eval_features(args, cfg, backbone, device, precision,
                                        ((bank, cfg.eval.knn_bank_size), (test, 0)))
    fb, ft = F.normalize(fb, dim=1), F.normalize(ft, dim=1)
    grid = knn_grid(fb, lb, ft, lt, len(bank.classes), ks, temps)
    for r in grid:
        print(f"kNN (k={r['k']}, T={r['temperature']}) of {args.checkpoint} at step {ckpt.get('step')}: "
              f"top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}")
    best = grid[0]
    print(json.dumps({"top1": best["top1"], "top5": best["top5"], "k": best["k"],
                      "temperature": best["temperature"], "step": ckpt.get("step"), "grid": grid}))
    return 0


def _load_for_eval(args):
    """Checkpoint -> (cfg, backbone on device, device, precision, bank, test), classes checked."""
    from .config import load_config
    from .data.cifar import DataError
    from .data.datasets import load_dataset
    from .methods import build_method
    from .train.checkpoint import load_checkpoint, load_state_strict
    from .train.loop import resolve_device, resolve_precision

    ckpt_path = Path(args.checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    cfg = load_config(None, args.overrides, base=ckpt["config"])
    device = resolve_device(args.device)
    method = build_method(cfg)
    load_state_strict(method, ckpt["model"], ckpt_path)
    bank = load_dataset(args.train_data, cfg.data, split="train").to(device)
    test = load_dataset(args.test_data, cfg.data, split="test").to(device)
    if bank.classes != test.classes:
        raise DataError(f"class folders differ between --train-data ({len(bank.classes)} classes) and "
                        f"--test-data ({len(test.classes)} classes)")
    return cfg, ckpt, method.backbone.to(device), device, resolve_precision(cfg.train.precision, device), bank, test


def cmd_linear(args) -> int:
    from .config import save_config
    from .eval.linear import assert_unchanged, fast_linear_probe, full_linear_probe, snapshot

    _setup_logging(Path(args.output_dir) if args.output_dir else None)
    from . import distributed as du

    cfg, ckpt, backbone, device, precision, train, test = _load_for_eval(args)
    du.init_from_env(device.type)
    if args.fast and not du.is_main():
        return 0  # the fast probe is cheap: rank 0 does it alone
    before = snapshot(backbone)
    if args.fast:
        (fa, la), (fb, lb) = _eval_features(args, cfg, backbone, device, precision, ((train, 0), (test, 0)))
        res = fast_linear_probe(fa, la, fb, lb, len(train.classes), cfg.linear)
    else:
        res = full_linear_probe(backbone, train, test, cfg.data, cfg.linear, device, precision)
    assert_unchanged(backbone, before)
    if not du.is_main():
        return 0
    out = {"top1": res["top1"], "top5": res["top5"], "lr": res["base_lr"], "mode": "fast" if args.fast else "full",
           "epochs": cfg.linear.epochs, "step": ckpt.get("step")}
    if "sweep" in res:
        out["sweep"] = res["sweep"]
    if args.output_dir:
        save_config(cfg, Path(args.output_dir) / "config.yaml")
        (Path(args.output_dir) / "result.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"linear probe ({out['mode']}) of {args.checkpoint}: top-1 {out['top1']:.2f}  top-5 {out['top5']:.2f}  "
          f"base_lr {out['lr']}")
    print(json.dumps(out))
    return 0


def cmd_finetune(args) -> int:
    from .eval.finetune import finetune
    from .export import backbone_state_from_checkpoint

    out = Path(args.output_dir)
    _setup_logging(out)
    cfg, ckpt, _, device, precision, train, test = _load_for_eval(args)
    state = None if args.from_scratch else backbone_state_from_checkpoint(ckpt)
    res = finetune(cfg, state, train, test, out, device, precision)
    from . import distributed as du

    if not du.is_main():
        return 0
    msg = {"top1": res["top1"], "top5": res["top5"], "from_scratch": args.from_scratch,
           "epochs": cfg.finetune.epochs, "output_dir": str(out)}
    (out / "result.json").write_text(json.dumps(msg, indent=2) + "\n")
    print(json.dumps(msg))
    return 0


def cmd_sweep(args) -> int:
    from .sweep import sweep

    out = Path(args.output_dir)
    _setup_logging(out)
    rows = sweep(args.config, args.data, args.eval_data, out, args.grid, args.overrides, not args.no_progress)
    print((out / "summary.md").read_text(), end="")
    print(json.dumps({"runs": len(rows), "summary": str(out / "summary.json")}))
    return 0


def cmd_report(args) -> int:
    from .report import make_report

    _setup_logging()
    page = make_report([Path(r) for r in args.runs], Path(args.output))
    print(json.dumps({"report": str(page), "figures": sorted(p.name for p in page.parent.glob("*.png"))}))
    return 0


def cmd_export(args) -> int:
    from .export import export_backbone

    _setup_logging()
    out = export_backbone(Path(args.checkpoint), Path(args.output))
    print(json.dumps({"output": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data.cifar import DataError
    from .train.checkpoint import CheckpointError
    from .train.loop import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"pretrain": cmd_pretrain, "knn": cmd_knn, "linear": cmd_linear, "finetune": cmd_finetune,
                "export": cmd_export, "sweep": cmd_sweep, "report": cmd_report}
    try:
        return commands[args.command](args)
    except (ConfigError, DataError, CheckpointError, TrainingError, NotImplementedError) as e:
        print(f"mocov3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mocov3 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
