"""The ``mocov3`` command: parses arguments and dispatches to the library, nothing else.

Every user error (bad config, missing data, unusable checkpoint) ends with one ``error:`` line on
stderr and exit code 2. ``key=value`` overrides may stand anywhere on the line.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import distributed as du
from .commands import COMMANDS as HELP, top_parser
from .config import describe_keys, load_config
from .data.cache import PARTS, cache_usage, clear_cache, resolve_cache_dir
from .data.shards import parse_size, write_shards
from .data.sources import shard_samples
from .eval.api import load_for_eval, run_finetune, run_knn, run_linear
from .export import EXPORT_FILES, FORMATS, export_backbone, push_to_hub, read_results
from .methods import METHODS
from .pretrain import pretrain, resolve_config
from .report import make_report
from .folders import claim, run_legacy
from .runtime import ConfigError, MocoError, cpu_auto_precision, error_message, first_line, launch_rank
from .submit import submit
from .sweep import sweep, sweep_legacy

log = logging.getLogger("mocov3")


def _setup_logging(output_dir: Path | None = None, quiet: bool = False, kind: str = "",
                   legacy=None) -> None:
    """Log to stderr, and (rank 0) to ``output_dir/log.txt`` once the folder is claimed for ``kind``
    (:func:`mocov3.folders.claim`: nothing is written into a folder that is not the command's own)."""
    level = logging.INFO if launch_rank() == 0 and not quiet else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output_dir is not None and launch_rank() == 0:
        claim(output_dir, kind, legacy=legacy)
        handlers.append(logging.FileHandler(output_dir / "log.txt"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


def _overrides(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config overrides, anywhere on the line, e.g. {example}")


def _pretrain_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain", help=HELP["pretrain"], formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Pretrain a backbone with MoCo v3 (or method={'|'.join(m for m in METHODS if m != 'mocov3')}). "
                    "Re-running the command on an existing output folder resumes it.", epilog=describe_keys())
    p.add_argument("--config", help="YAML recipe (see configs/); default: the built-in defaults, or the "
                                    "config of the checkpoint being resumed")
    p.add_argument("--data", help="image folder (one subfolder per class), shards (a folder or a URL), "
                                  "hf:NAME[:SPLIT] or cifar10 / cifar100 (docs/data.md); recorded as data.path; "
                                  "optional when resuming")
    p.add_argument("--eval-data", help="labelled test set for the kNN monitor (bank: --data), e.g. cifar10:test")
    p.add_argument("--output-dir", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints")
    p.add_argument("--resume", help="checkpoint to resume from (default: OUTPUT_DIR/checkpoint.pt if present)")
    p.add_argument("--init-from", metavar="FILE",
                   help="start a new run from these weights: a mocov3 checkpoint, or one of the reference "
                        "implementation's (pretraining, linear-probe or DeiT layout; a backbone alone leaves the "
                        "heads as initialized). Ignored when the run resumes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-changed", default="", metavar="KEY[,KEY]",
                   help="resume although these run-defining settings differ from the checkpoint's (only changes "
                        "the run can go on through, e.g. train.epochs, optim.base_lr, data; docs/reliability.md)")
    _overrides(p, "epochs=10 base_lr=1e-4")


def _eval_parser(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """Arguments shared by the evaluation commands (a checkpoint, a labelled train and test set)."""
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (checkpoint.pt of a run folder)")
    p.add_argument("--train-data", required=True, help="labelled training set / kNN bank (folder or cifar10 ...)")
    p.add_argument("--test-data", required=True, help="labelled test set (image folder or cifar10:test ...)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature and decode caches")
    _overrides(p, example)
    return p


def _run_options(p: argparse.ArgumentParser, what: str) -> None:
    """Options of the commands that are runs (resumable, signal-safe): fine-tuning and the full probe."""
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-changed", default="", metavar="KEY[,KEY]",
                   help=f"resume the run folder although {what} differ, or train.precision")


def _allowed(args) -> list[str]:
    return [k.strip() for k in args.allow_changed.split(",") if k.strip()]


def _stopped(res: dict) -> int:
    """A run that a signal stopped: the exit status of that signal (the command resumes when re-run)."""
    log.warning("stopped at step %d; run the same command again to resume", res["step"])
    return 128 + res["interrupted_by"]


def build_parser() -> argparse.ArgumentParser:
    parser, sub = top_parser()
    _pretrain_parser(sub)
    p = _eval_parser(sub, "knn", HELP["knn"],
                     "eval.knn_bank_size=10000 train.precision=fp32")
    p.add_argument("--k", help="neighbours, one or a comma list (e.g. 10,20,200); the first is reported as top1")
    p.add_argument("--temperature", help="temperature(s), comma list (default eval.knn_temperature)")
    p = _eval_parser(sub, "linear", HELP["linear"],
                     "linear.epochs=100 linear.lr_sweep=[0.1,1.0] linear.bn=false")
    p.add_argument("--fast", action="store_true",
                   help="train on cached features (no augmentation) with an lr sweep chosen on a held-out split")
    p.add_argument("--output-dir", help="folder for config.yaml and result.json; the full probe is a run there "
                                        "(checkpoint.pt, metrics.jsonl; re-running resumes it)")
    _run_options(p, "the probed checkpoint (source) or linear.epochs / linear.batch_size")
    p = _eval_parser(sub, "finetune", HELP["finetune"],
                     "finetune.epochs=10 finetune.batch_size=256 finetune.layer_decay=0.65")
    _run_options(p, "its source (checkpoint, from scratch) or finetune.epochs / finetune.batch_size")
    p.add_argument("--output-dir", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoint.pt")
    p.add_argument("--from-scratch", action="store_true",
                   help="same architecture from random init (the checkpoint only supplies the architecture)")
    p = sub.add_parser("sweep", help=HELP["sweep"])
    p.add_argument("--config", help="YAML recipe shared by every run")
    p.add_argument("--data", required=True, help="training data of every run")
    p.add_argument("--eval-data", help="test set for the kNN monitor")
    p.add_argument("--output-dir", required=True, help="one sub-folder per run, plus summary.json / summary.md")
    p.add_argument("--grid", nargs="+", required=True, metavar="key=v1,v2", help="e.g. base_lr=1e-4,5e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _overrides(p, "epochs=2 (shared by every run)")
    p = sub.add_parser("report", help=HELP["report"])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (finished or not)")
    p.add_argument("--output", required=True, help="folder for the figures and report.md")
    p = sub.add_parser("export", help=HELP["export"])
    p.add_argument("--checkpoint", required=True, help="a training checkpoint")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--format", choices=FORMATS, default="mocov3",
                   help="mocov3: config.json with mocov3's description; timm-hub: the folder timm loads from the "
                        "Hugging Face Hub (config.json with architecture, model_args, pretrained_cfg)")
    p.add_argument("--results", nargs="+", default=[], metavar="JSON",
                   help="evaluation results for the model card: result.json of mocov3 linear / finetune, or the "
                        "JSON line mocov3 knn prints (checked to be of the same step)")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this Hugging Face Hub repo "
                                                          "(needs huggingface_hub and a login)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--license", help="the weights' license in the card (a Hub licence id; default: cc-by-nc-4.0 for "
                                     "the reference implementation's weights, else mit)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --output (a folder that holds anything else is refused)")
    p = sub.add_parser("submit", help=HELP["submit"])
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (one task each)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node (default: --gpus-per-node)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", default="72:00:00", help="time limit, [days-]hours:minutes:seconds")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--qos", help="SLURM quality of service")
    p.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (data workers + 1)")
    p.add_argument("--mem-gb", type=int, default=None, help="memory per node (GB)")
    p.add_argument("--folder", default="submitit_logs", help="submitit's folder for logs and job files")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues itself")
    p.add_argument("--max-requeues", type=int, default=100,
                   help="times the job requeues itself at its time limit (preemptions requeue without limit)")
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                   help="slurm, or local (this machine, submitit's local executor: tests and debugging)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and return its exit status")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the mocov3 command to run")
    p = sub.add_parser("shard", help=HELP["shard"])
    p.add_argument("src", metavar="SOURCE", help="what --data takes: an image folder, hf:NAME[:SPLIT], shards (a "
                                                  "folder or a URL), cifar10[:test]; images' bytes copied as they are")
    p.add_argument("out", metavar="OUT_DIR", help="empty folder for shard-NNNNNN.tar and index.json")
    p.add_argument("--shard-size", default="512MB", help="largest shard (e.g. 512MB, 1GB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one-time shuffle of the samples")
    _overrides(p, "data.image_column=img data.label_column=fine_label")
    p = sub.add_parser("cache", help=HELP["cache"])
    p.add_argument("--clear", nargs="*", choices=PARTS, metavar="PART",
                   help=f"delete these parts ({', '.join(PARTS)}; all when none is named)")
    p.add_argument("--cache-dir", help="cache root (default $MOCOV3_CACHE or ~/.cache/mocov3)")
    p.add_argument("--json", action="store_true", help="the sizes as one JSON line (for scripts), not a table")
    return parser


def _number_list(text: str | None, kind) -> list | None:
    if text is None:
        return None
    try:
        vals = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected a comma-separated list of numbers, got {text!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise ConfigError(f"expected positive numbers, got {text!r}")
    return vals


def _print_json(obj: dict) -> None:
    if launch_rank() == 0 and obj:
        print(json.dumps(obj))


def cmd_pretrain(args) -> int:
    out = Path(args.output_dir)
    cfg = resolve_config(args.config, args.overrides, out, args.data, args.eval_data, args.resume)
    _setup_logging(out, kind="pretrain", legacy=run_legacy("pretrain"))
    init = Path(args.init_from) if args.init_from else None
    res = pretrain(cfg, out, resume=args.resume, progress=not args.no_progress, allow_changed=_allowed(args),
                   init_from=init)
    if res.interrupted_by:
        return _stopped({"step": res.step, "interrupted_by": res.interrupted_by})
    msg = {"step": res.step, "finished": res.finished, "output_dir": str(out)}
    if res.last_knn:
        msg.update({"knn_top1": res.last_knn["top1"], "knn_top5": res.last_knn["top5"]})
    if res.unreadable:
        msg["unreadable_images"] = res.unreadable
    _print_json(msg)
    return 0


def cmd_knn(args) -> int:
    _setup_logging()
    setup = load_for_eval(Path(args.checkpoint), args.train_data, args.test_data, args.device, args.overrides,
                          use_cache=not args.no_cache)
    res = run_knn(setup, _number_list(args.k, int), _number_list(args.temperature, float), not args.no_cache)
    for r in res["grid"]:
        print(f"kNN (k={r['k']}, T={r['temperature']}) of {args.checkpoint} at step {res['step']}: "
              f"top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}")
    _print_json(res)
    return 0


def cmd_linear(args) -> int:
    _setup_logging(Path(args.output_dir) if args.output_dir else None, kind="linear", legacy=run_legacy("linear"))
    setup = load_for_eval(Path(args.checkpoint), args.train_data, args.test_data, args.device, args.overrides,
                          use_cache=not args.no_cache)
    out = run_linear(setup, args.fast, not args.no_cache, Path(args.output_dir) if args.output_dir else None,
                     progress=not args.no_progress, allow_changed=_allowed(args))
    if "interrupted_by" in out:
        return _stopped(out)
    if out:
        print(f"linear probe ({out['mode']}) of {args.checkpoint}: top-1 {out['top1']:.2f}  "
              f"top-5 {out['top5']:.2f}  base_lr {out['lr']}")
        _print_json(out)
    return 0


def cmd_finetune(args) -> int:
    _setup_logging(Path(args.output_dir), kind="finetune", legacy=run_legacy("finetune"))
    setup = load_for_eval(Path(args.checkpoint), args.train_data, args.test_data, args.device, args.overrides,
                          use_cache=not args.no_cache)
    res = run_finetune(setup, Path(args.output_dir), args.from_scratch, progress=not args.no_progress,
                       allow_changed=_allowed(args))
    if "interrupted_by" in res:
        return _stopped(res)
    _print_json(res)
    return 0


def cmd_sweep(args) -> int:
    out = Path(args.output_dir)
    _setup_logging(out, kind="sweep", legacy=sweep_legacy)
    rows = sweep(args.config, args.data, args.eval_data, out, args.grid, args.overrides, not args.no_progress)
    print((out / "summary.md").read_text(), end="")
    _print_json({"runs": len(rows), "summary": str(out / "summary.json")})
    return 0


def cmd_report(args) -> int:
    _setup_logging()
    page = make_report([Path(r) for r in args.runs], Path(args.output))
    _print_json({"report": str(page), "figures": sorted(p.name for p in page.parent.glob("*.png"))})
    return 0


def cmd_export(args) -> int:
    _setup_logging()
    out = export_backbone(Path(args.checkpoint), Path(args.output), read_results(args.results), args.format,
                          overwrite=args.overwrite, repo_id=args.push_to_hub, license=args.license)
    info = {"output": str(out), "format": args.format, "files": sorted(EXPORT_FILES)}
    if args.push_to_hub:
        info["hub_url"] = push_to_hub(out, args.push_to_hub, args.private)
    _print_json(info)
    return 0


def cmd_submit(args) -> int:
    _setup_logging()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    job = submit(argv, args.nodes, args.gpus_per_node, args.partition, args.time, args.account, args.qos,
                 args.cpus_per_task, args.mem_gb, args.folder, args.signal_delay, args.executor, args.tasks_per_node,
                 args.max_requeues)
    _print_json({"job_id": str(job.job_id), "folder": args.folder})
    if args.wait:
        try:
            job.results()
        except Exception as e:  # noqa: BLE001 - submitit re-raises the task's failure with its traceback
            print(f"mocov3 submit: error: job {job.job_id} failed: {_job_cause(job, e)}", file=sys.stderr)
            return 1
    return 0


def _job_cause(job, e: BaseException) -> str:
    """Why a submitted job failed: the command's own ``error:`` line from the job's log when there is one
    (submitit's exception says only which task exited), else the exception's first line, and where the logs are."""
    try:
        log_text = job.stderr() or ""
    except Exception:  # noqa: BLE001 - no log (yet): the exception is all there is
        log_text = ""
    errors = [line.strip() for line in log_text.splitlines() if ": error: " in line or line.startswith("Error")]
    cause = errors[-1] if errors else first_line(e)
    where = getattr(job, "paths", None)
    return cause + (f" (log: {where.stderr})" if where is not None else "")


def cmd_shard(args) -> int:
    _setup_logging()
    out, size = Path(args.out), parse_size(args.shard_size)
    skipped: list = []
    samples, classes, source = shard_samples(args.src, load_config(None, args.overrides).data, args.seed, out,
                                             skipped)
    index = write_shards(samples, classes, source, out, size, args.seed)
    if skipped:
        log.warning("%d unreadable images were left out of the shards (see the warnings above)", len(skipped))
    _print_json({"output": args.out, "shards": len(index["shards"]), "images": index["total"],
                 "classes": len(index["classes"]), **({"unreadable_images": len(skipped)} if skipped else {})})
    return 0


def cmd_cache(args) -> int:
    root = Path(args.cache_dir).expanduser() if args.cache_dir else resolve_cache_dir()
    if args.clear is not None:
        freed = clear_cache(root, args.clear or PARTS)
        _print_json({"cache_dir": str(root), "cleared": args.clear or list(PARTS), "freed_mb": round(freed / 1e6, 1)})
        return 0
    usage = cache_usage(root)
    precision, why = cpu_auto_precision()  # a rule on the CPU, nothing kept in the cache (nothing to clear)
    if args.json:
        _print_json({"cache_dir": str(root), "mb": {k: round(v / 1e6, 1) for k, v in usage.items()},
                     "cpu_auto_precision": precision, "cpu_auto_precision_reason": why})
        return 0
    what = {"decoded": "decoded image folders (remade on the next run)",
            "features": "backbone features of evaluated checkpoints (remade by the next knn / linear)",
            "downloads": "CIFAR archives and their extracted files (downloaded again when needed)"}
    rows = [(part, _mb(usage[part]), f"mocov3 cache --clear {part}", what[part]) for part in PARTS]
    rows.append(("all", _mb(sum(usage.values())), "mocov3 cache --clear", ""))
    print(f"cache: {root}  (MOCOV3_CACHE or --cache-dir sets it)")
    widths = [max(len(r[i]) for r in rows + [("part", "size", "removed by", "")]) for i in range(3)]
    for r in [("part", "size", "removed by", "what")] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + ("  " + r[3] if r[3] else ""))
    print(f"train.precision=auto on this CPU: {precision} ({why}; decided by the CPU's capabilities, not by a "
          f"timing, so not kept here)")
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


COMMANDS = {"pretrain": cmd_pretrain, "knn": cmd_knn, "linear": cmd_linear, "finetune": cmd_finetune,
            "export": cmd_export, "sweep": cmd_sweep, "report": cmd_report, "cache": cmd_cache, "shard": cmd_shard,
            "submit": cmd_submit}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "submit":  # everything after -- belongs to the submitted command
        args.argv = list(args.argv) + extra
        extra = []
    if hasattr(args, "overrides"):  # key=value after a flag: argparse leaves it in ``extra``
        kv = [a for a in extra if "=" in a and not a.startswith("-")]
        args.overrides = list(args.overrides) + kv
        extra = [a for a in extra if a not in kv]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        rc = COMMANDS[args.command](args)
        if rc == 0:
            du.shutdown()
        return rc
    except (MocoError, NotImplementedError) as e:
        print(f"mocov3 {args.command}: error: {error_message(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except OSError as e:  # the environment (permissions, a file where a folder should be, disk full)
        where = f": {e.filename}" if e.filename else ""
        print(f"mocov3 {args.command}: error: {e.strerror or first_line(e)}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mocov3 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
