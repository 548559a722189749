"""One run, for every trainer: pretraining, fine-tuning and the full linear probe.

    Runtime (device, process group, precision) -> RunFolder (lock, stale temporary files, resume guards,
    config.yaml, sinks) -> the trainer's data and state -> restore or start -> fit(step, hooks)

A trainer declares what it is once (:class:`Trainer`: its task name, the keys that define one of its runs and
the changes a resume may go through), builds its data and :class:`~.step.TrainState`, and hands
:meth:`Run.fit` its step and its own hooks; everything a long run on a cluster needs comes from here, the
same for every trainer: the stop signal (SIGTERM / SIGINT -> a checkpoint after the current step), exact
mid-epoch resume, the lock, the resume guards, the time budget (``train.budget_minutes``), metrics.jsonl with
TensorBoard / W&B, the progress bar and the ``mfu`` of the log lines.

This is the only module that initializes the process group or resolves the device and the precision
(tests/test_architecture.py checks it). The precision is decided once per run, at its start: it is recorded
in config.yaml (``run.precision``) and in every checkpoint, and a resume keeps it, so that a run started in
fp32 is not resumed in bf16 because the machine was busier when the timing check ran (which would break the
bit-exact resume).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import yaml

from .. import cpus
from .. import distributed as du
from ..config import Config, to_dict
from ..folders import run_legacy, write_atomic
from ..models.factory import backbone_spec, check_fits
from ..runtime import (CheckpointError, ConfigError, MetricsWriter, StorageError, TrainingError, cpu_has_fast_bf16,
                       first_line, resolve_device, resolve_precision, storage_error)
from ..tracking import open_sinks
from . import budget, sharded
from .flops import peak_flops
from .checkpoint import (COMPUTE_ONLY, Payload, check_same_model, normalized_config, refuse_changes,
                         remove_stale_tmp, rng_state, set_rng_state)
from .loop import Hook, MetricsHook, Progress, RunLength, StepFn, fit
from .step import TrainState

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


# ------------------------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    """Where a run computes. ``precision`` is settled by :meth:`Run.open` (it may come from a checkpoint);
    ``threads`` by :meth:`settle_threads` (again once the data says how many workers it starts)."""

    device: torch.device
    world: int
    rank: int
    precision: str = "fp32"
    threads: int = 0
    threads_reason: str = ""

    def settle_threads(self, setting, workers: int = 0) -> None:
        """``train.threads`` for this process, beside ``workers`` data workers (cpus.choose_threads); said in
        one log line when it changes, and in every run's start record (:meth:`describe_threads`)."""
        n, why = cpus.choose_threads(setting, workers)
        if n is not None and n != torch.get_num_threads():
            torch.set_num_threads(n)
        threads, self.threads_reason = torch.get_num_threads(), why
        if threads != self.threads or not self.threads:
            log.info("%d CPU thread(s) (%s); OpenMP wait policy %s", threads, why, cpus.wait_policy())
        self.threads = threads

    def describe_threads(self) -> dict:
        return {"threads": self.threads, "threads_reason": self.threads_reason, "omp_wait_policy": cpus.wait_policy()}


def build_runtime(device: str = "auto", threads="auto") -> Runtime:
    """This rank's device (its own GPU under torchrun), the process group (from torchrun's environment),
    the CPU threads. The only place these are set up."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before NCCL initializes, so each rank owns its GPU
    du.init_from_env(dev.type)
    rt = Runtime(dev, du.world_size(), du.rank(), resolve_precision("fp32", dev))
    rt.settle_threads(threads)  # no data workers yet: decoding a set into memory gets every CPU
    return rt


def use_compile(setting: str, device: torch.device) -> bool:
    """``train.compile``: auto = on CUDA (a cold CPU compile takes tens of seconds)."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def eval_precision(asked: Optional[str], recorded: Optional[str], device: torch.device) -> str:
    """The precision of a one-off evaluation of a checkpoint (kNN, the fast probe).

    ``asked`` (a ``train.precision`` the user gave on this command line) wins, ``auto`` included; otherwise
    the checkpoint's own: the precision its run recorded, fp32 where it records none (the reference
    implementation's files, a backbone alone). Deciding it here from the machine would make one checkpoint's
    kNN differ between machines and, with a timed decision, between two calls on one machine (issue 30)."""
    if asked:
        return resolve_precision(asked, device)
    precision = recorded or "fp32"
    if device.type == "cpu" and precision == "fp16":  # a GPU's stand-in for bf16; no meaning on a CPU
        log.info("the checkpoint was trained in fp16 on a GPU; evaluating in fp32 on the CPU")
        return "fp32"
    if device.type == "cpu" and precision == "bf16" and not cpu_has_fast_bf16():
        log.warning("evaluating in bf16 as the checkpoint records; this CPU emulates bf16 (slow): "
                    "train.precision=fp32 is faster")
    return resolve_precision(precision, device)


# ------------------------------------------------------------------------------------------ trainers
@dataclass(frozen=True)
class Trainer:
    """What a trainer is, declared once: ``task`` (written into its checkpoints), ``run_keys`` (section ->
    the keys that define one of its runs, or None for every key of the section: a resume that changes one is
    refused), ``sound_changes`` (what ``--allow-changed`` may accept: the run's state stays meaningful), and
    ``batch_size`` / ``epochs`` (the config keys of its global batch and its length)."""

    task: str
    run_keys: dict
    sound_changes: tuple
    batch_size: str
    epochs: str

    def get(self, cfg: Config, dotted: str):
        sec, key = dotted.split(".")
        return getattr(getattr(cfg, sec), key)


def run_differences(trainer: Trainer, old: dict, new: dict) -> list[str]:
    """The run-defining keys of ``trainer`` whose values differ between two config dicts."""
    out = []
    for sec, keys in trainer.run_keys.items():
        for k in (keys or sorted(set(old.get(sec, {})) | set(new.get(sec, {})))):
            if (sec, k) not in COMPUTE_ONLY and old.get(sec, {}).get(k) != new.get(sec, {}).get(k):
                out.append(f"{sec}.{k}")
    return out


def _get(cfg: dict, dotted: str):
    sec, key = dotted.split(".")
    return cfg.get(sec, {}).get(key)


# ------------------------------------------------------------------------------------------- the run
@dataclass
class RunFolder:
    path: Path
    checkpoint: Path  # the checkpoint to resume from (may not exist)
    metrics: MetricsWriter

    @property
    def resuming(self) -> bool:
        return self.checkpoint.is_file()


class Run:
    """One run of ``trainer`` in ``output_dir``: a context manager holding the folder's lock.

    ``Run(...)`` builds the runtime (or takes ``rt``); ``with`` locks the folder and removes what a killed
    save left; :meth:`open` reads the checkpoint to resume (if any), applies the resume guards, settles the
    precision, writes config.yaml and opens the sinks; then :meth:`restore` or :meth:`start`, and
    :meth:`fit`."""

    def __init__(self, trainer: Trainer, cfg: Config, output_dir: Path, resume: Optional[Path] = None,
                 allow_changed: Sequence[str] = (), progress: bool = True, rt: Optional[Runtime] = None,
                 sink_config: Optional[dict] = None):
        self.trainer, self.cfg, self.allow_changed, self.progress = trainer, cfg, tuple(allow_changed), progress
        self.started = budget.clock()  # the time budget (train.budget_minutes) counts from here
        check_fits(backbone_spec(cfg.model, cfg.data.image_size))  # before a folder or a device is touched
        self.rt = rt or build_runtime(cfg.train.device, cfg.train.threads)
        batch = trainer.get(cfg, trainer.batch_size)
        if batch % self.rt.world != 0:
            raise TrainingError(f"{trainer.batch_size} {batch} is not divisible by the {self.rt.world} processes")
        output_dir = Path(output_dir)
        ckpt = Path(resume) if resume else output_dir / CHECKPOINT_NAME
        if resume and not ckpt.is_file():
            raise CheckpointError(f"checkpoint not found: {resume}")
        own = output_dir / CHECKPOINT_NAME
        started = own.exists() or (output_dir / "metrics.jsonl").exists()
        if resume and started and not (own.is_file() and own.resolve() == ckpt.resolve()):
            # a folder holds one run: resuming another checkpoint into it would replace its checkpoint and
            # drop its metrics after that checkpoint's step
            raise CheckpointError(f"{output_dir} holds a run of its own; --resume {resume} starts a "
                                  f"new run only in an empty folder: run without --resume to continue that run, "
                                  f"or choose another --output-dir")
        if output_dir.exists() and not output_dir.is_dir():
            raise StorageError(f"output folder {output_dir} is a file")
        self.folder = RunFolder(output_dir, ckpt, MetricsWriter(output_dir / "metrics.jsonl", du.is_main()))
        self.sink_config = sink_config
        self.payload: Optional[Payload] = None
        self.length: Optional[RunLength] = None
        self._lock = None

    # -- the folder
    def __enter__(self) -> "Run":
        # a folder is the run's only if a run of this task made it (or an older mocov3's run: its checkpoint)
        self._lock = du.locked_folder(self.folder.path, self.trainer.task, legacy=run_legacy(self.trainer.task))
        self._lock.__enter__()
        if du.is_main():
            remove_stale_tmp(self.folder.path)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.folder.metrics.close()
        finally:
            self._lock.__exit__(*exc)

    @property
    def resuming(self) -> bool:
        return self.folder.resuming

    def open(self, differences: Optional[Callable[[Payload], dict]] = None) -> Optional[Payload]:
        """Read the checkpoint to resume (None for a new run) and refuse it when what defines the run differs
        (``trainer.run_keys``, the precision, and ``differences(payload)``: the trainer's own ``{key: (before,
        now)}``, e.g. the data's identity or the fine-tuned source) unless ``--allow-changed`` accepts it;
        then settle the precision, write config.yaml and open the sinks. Nothing in the folder changes
        before the checks pass."""
        cfg, rt = self.cfg, self.rt
        bad = [k for k in self.allow_changed if k not in self.trainer.sound_changes]
        if bad:
            raise ConfigError(f"--allow-changed {', '.join(bad)}: not a change a run can "
                              f"resume through ({self.trainer.task}; allowed: {', '.join(self.trainer.sound_changes)})")
        recorded = None
        if self.resuming:
            # under FSDP each rank reads its own shards of a sharded checkpoint (restore); else it is read whole
            sharding = cfg.train.strategy == "fsdp" and rt.world > 1
            p = Payload.read(self.folder.checkpoint, map_location=rt.device, for_resume=True, materialize=not sharding)
            if p.task != self.trainer.task:
                raise CheckpointError(f"{self.folder.checkpoint} is a {p.task} checkpoint, not a {self.trainer.task} "
                                      f"run's: use another --output-dir")
            old = normalized_config(p.config, self.folder.checkpoint)
            now = to_dict(cfg)
            budget_info = p.extra.get("budget")
            if budget_info and cfg.train.budget_minutes > 0:
                # the epochs the budget decided are kept (make_length); the configured ones were their bound
                # (mocov3 0.3 wrote the decided ones into the config)
                sec, key = self.trainer.epochs.split(".")
                old[sec][key] = now[sec][key]
                log.info("resuming a run whose time budget set %d epochs", int(budget_info["epochs"]))
            check_same_model(old, now, self.folder.checkpoint)
            diffs = {k: (_get(old, k), _get(now, k)) for k in run_differences(self.trainer, old, now)}
            recorded = p.precision
            if recorded and cfg.train.precision not in ("auto", recorded):
                diffs["train.precision"] = (recorded, cfg.train.precision)
            if differences is not None:
                diffs.update(differences(p))
            allowed = set(self.allow_changed)
            if "data" in allowed:
                allowed |= {k for k in diffs if k.startswith("data.")}
            refuse_changes(diffs, allowed, f"{self.folder.checkpoint} was trained with other settings",
                           "resume with the same ones, use another --output-dir, or accept a sound change with",
                           shown=4)
            if diffs:
                log.warning("resuming with changed settings (allowed): %s", ", ".join(diffs))
            if "train.precision" in diffs:
                recorded = None
            self.payload = p
        rt.precision = recorded if recorded else resolve_precision(cfg.train.precision, rt.device)
        if recorded:
            log.info("precision %s, as recorded when the run started", recorded)
        # the sinks first: a W&B start that fails leaves config.yaml as it was
        self.folder.metrics.sinks = open_sinks(self.folder.path, cfg.train, self.sink_config or to_dict(cfg),
                                               du.is_main())
        self.write_config()
        if cfg.train.checkpoint_format == "sharded" and not (cfg.train.strategy == "fsdp" and rt.world > 1):
            log.warning("train.checkpoint_format=sharded applies to train.strategy=fsdp with several processes; "
                        "this run writes full checkpoints (which every command reads)")
        return self.payload

    def record(self) -> dict:
        """What the run decided (config.yaml's ``run`` section; not a setting, ignored when read back)."""
        rec = {"task": self.trainer.task, "precision": self.rt.precision, "world_size": self.rt.world,
               "device": self.rt.device.type}
        if self.length is not None and self.length.decision:
            rec["epochs"] = self.length.epochs
        return rec

    def write_config(self) -> None:
        if not du.is_main():
            return
        path = self.folder.path / "config.yaml"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, yaml.safe_dump({**to_dict(self.cfg), "run": self.record()}, sort_keys=False))
        except OSError as e:
            raise storage_error("write", path, e) from None

    # -- the run's length and state
    def make_length(self, steps_per_epoch: int) -> RunLength:
        """The run's length: ``trainer.epochs`` of ``steps_per_epoch``, or the epochs a time budget decided
        (kept on resume), limited by ``train.max_steps`` in this invocation."""
        epochs = self.trainer.get(self.cfg, self.trainer.epochs)
        decision = self.payload.extra.get("budget") if self.payload is not None else None
        if decision and self.cfg.train.budget_minutes > 0:
            epochs = int(decision["epochs"])
        self.length = RunLength(epochs, steps_per_epoch, self.cfg.train.max_steps, decision)
        return self.length

    def start(self, record: dict) -> None:
        """A new run: an empty metrics file starting with a ``start`` record."""
        self.folder.metrics.truncate_after(-1)
        self.folder.metrics.write({"step": 0, "epoch": 0.0, "event": "start", "task": self.trainer.task,
                                   "world_size": self.rt.world, "precision": self.rt.precision,
                                   **self.rt.describe_threads(), **record})

    def restore(self, state: TrainState) -> None:
        """Model, optimizer, scaler, step, RNG and monitor state from the checkpoint; metrics logged after
        it are dropped."""
        p, path = self.payload, self.folder.checkpoint
        try:
            if p.sharded_folder is not None and not p.model:  # every rank reads its own shards
                sharded.load_into(state.module, state.optimizer, p.sharded_folder, p.shard_info["param_groups"])
            else:
                du.load_full_state_dict(state.module, p.model)
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {first_line(e)}") from None
        try:
            if p.optimizer:
                du.load_full_optimizer_state(state.module, state.optimizer, p.optimizer)
            if p.scaler:
                state.scaler.load_state_dict(p.scaler)
            set_rng_state(p.rng)
            if state.monitor is not None and p.extra.get("monitor"):
                state.monitor.load_state_dict(p.extra["monitor"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer or RNG state does not fit ({first_line(e)})") \
                from None
        state.step = p.step
        self.folder.metrics.truncate_after(state.step)
        spe = self.length.steps_per_epoch if self.length is not None else 0
        # marks where the run went on (`mocov3 report` draws it): the metrics before and after are one run
        self.folder.metrics.write({"step": state.step, "epoch": state.step / spe if spe else None, "event": "resume",
                                   **self.rt.describe_threads()})
        log.info("resumed from %s at step %d", path, state.step)

    # -- the loop
    def metrics_hook(self, state: TrainState, batch_size: int, extra: Optional[Callable[[], dict]] = None,
                     flops_per_image: Callable[[], float] | float = 0.0) -> MetricsHook:
        """Log lines (loss, lr, images/s, gradient norms, and ``mfu`` where the device's peak is known: the
        model FLOPs of one training step per image, ``flops_per_image``, counted only then)."""
        peak = peak_flops(self.rt.device, self.cfg.train.peak_tflops)
        mfu = None
        if peak and callable(flops_per_image):  # a count that costs a forward pass: only when it is used
            flops_per_image = flops_per_image()
        if not callable(flops_per_image) and flops_per_image:
            log.info("%.3g GFLOPs per image per step%s", flops_per_image / 1e9,
                     f"; peak {peak / 1e12:.0f} TFLOPS per device" if peak else "")
        if peak and flops_per_image:
            world = self.rt.world
            mfu = lambda ips: flops_per_image * ips / world / peak  # noqa: E731
        return MetricsHook(self.folder.metrics, batch_size, self.progress, state.step, self.length, extra=extra,
                           state=state, mfu=mfu)

    def checkpoint_hook(self, state: TrainState, extras: Callable[[], dict]) -> "CheckpointHook":
        return CheckpointHook(self, state, extras)

    def time_budget(self, state: TrainState, eval_cost: Callable[[float], tuple[float, float]],
                    eval_every: int) -> Optional[budget.TimeBudget]:
        """The hook of ``train.budget_minutes`` (None when off, or when a resumed run already decided)."""
        if self.cfg.train.budget_minutes <= 0 or self.length.decision:
            return None
        length, metrics = self.length, self.folder.metrics

        def apply(epochs: int, info: dict, p: Progress) -> None:
            if p.step > state.warmup_steps:
                log.warning("the time budget set the epochs after the warm-up ended (step %d > %d): the cosine "
                            "decay changes course here; a warm-up of more than %d steps avoids that", p.step,
                            state.warmup_steps, budget.WARM_STEPS + budget.PROBE_STEPS)
            length.set_epochs(epochs, info)
            self.write_config()
            metrics.write({"step": p.step, "epoch": p.epoch, "event": "budget", **info})

        return budget.TimeBudget(self.cfg.train.budget_minutes * 60.0, self.started,
                                 self.trainer.get(self.cfg, self.trainer.epochs), eval_every, eval_cost, apply,
                                 self.rt.device, start_step=state.step, refine_at=state.warmup_steps)

    def fit(self, state: TrainState, batches, step: StepFn, hooks: Iterable[Hook]) -> int:
        """:func:`~.loop.fit` from ``state.step`` over this run's length; returns the stop signal (0: done)."""
        progress = Progress(state.step, self.length, self.cfg.train.log_every)
        return fit(state, batches, progress, [h for h in hooks if h is not None], step)


class CheckpointHook(Hook):
    """An atomic ``checkpoint.pt`` at each epoch end (plus numbered copies for ``train.save_epochs``), every
    ``train.checkpoint_every_steps`` steps, at the last step and when a stop signal arrives. ``extras()``: the
    trainer's own entries (:class:`~.checkpoint.Payload` ``extra``)."""

    def __init__(self, run: Run, state: TrainState, extras: Callable[[], dict]):
        self.run, self.state, self.extras = run, state, extras
        self.cfg = run.cfg
        self.saved_at = -1

    def after_step(self, p: Progress, out: dict) -> None:
        every = self.cfg.train.checkpoint_every_steps
        if p.end_of_epoch or p.stop_signal or p.last_step or (every and p.step % every == 0):
            self.save(p)

    def on_stop(self, p: Progress) -> None:
        if self.saved_at != p.step:
            self.save(p)

    def sharded(self) -> bool:
        """Whether checkpoints are written as shards (``train.checkpoint_format``)."""
        return du.is_sharded(self.state.module) and self.cfg.train.checkpoint_format in ("auto", "sharded")

    def save(self, p: Progress) -> None:
        self.state.raise_if_nonfinite()  # never a checkpoint of a step after a non-finite loss
        self.saved_at = p.step
        s, path = self.state, self.run.folder.path
        if self.sharded():
            folder = sharded.new_folder(path, p.step)
            groups = sharded.save(s.module, s.optimizer, folder)
            model, optim, info = {}, {}, {"folder": folder.name, "param_groups": groups}
        elif du.is_main() or du.is_sharded(s.module):  # under FSDP every rank takes part in the gathering
            model, optim, info = du.full_state_dict(s.module), du.full_optimizer_state(s.module, s.optimizer), None
        else:
            return
        if not du.is_main():
            return
        extra = dict(self.extras())
        if self.run.length.decision:
            extra["budget"] = self.run.length.decision
        payload = Payload(task=self.run.trainer.task, model=model, optimizer=optim, config=to_dict(self.cfg),
                          step=p.step, epoch=p.epoch, rng=rng_state(), precision=self.run.rt.precision,
                          scaler=s.scaler.state_dict() if s.scaler.is_enabled() else {}, extra=extra, shard_info=info)
        payload.write(path / CHECKPOINT_NAME)
        ep = p.step // p.steps_per_epoch
        if p.end_of_epoch and ep in self.cfg.train.save_epochs:
            payload.write(path / f"checkpoint_epoch{ep:04d}.pt")
        if info is not None:
            sharded.remove_unreferenced(path)


class EpochEvalHook(Hook):
    """An evaluation at epoch ends (every ``every`` epochs and at the last step): ``evaluate()``, called on
    every rank (rank 0 evaluates, the others return ``{}``) -> a dict of metrics written with the step (keys
    prefixed by ``prefix``) and kept
    in ``last`` (saved in checkpoints by the trainer). Its time is left out of images/s and of the budget."""

    def __init__(self, evaluate: Callable[[], dict], every: int, metrics: MetricsWriter, prefix: str = "test_",
                 last: Optional[dict] = None):
        self.evaluate, self.every, self.metrics, self.prefix, self.last = evaluate, every, metrics, prefix, last
        self.ran = 0  # evaluations in this invocation, counted on every rank alike

    def after_step(self, p: Progress, out: dict) -> None:
        if not p.end_of_epoch or p.stop_signal:
            return
        ep = p.step // p.steps_per_epoch
        if ep % self.every and p.step != p.total_steps:
            return
        t0 = time.time()
        res = self.evaluate()  # every rank calls it (a sharded model is gathered first); rank 0's counts
        self.ran += 1
        if du.is_main():
            self.last = res
            self.metrics.write({"step": p.step, "epoch": float(ep),
                                **{f"{self.prefix}{k}": v for k, v in self.last.items()}})
            log.info("epoch %d: %s (%.0f s)", ep, ", ".join(f"{self.prefix}{k} {v:.2f}" for k, v in
                                                          self.last.items()), time.time() - t0)
        du.barrier()
        p.eval_seconds += time.time() - t0


__all__ = ["Run", "Runtime", "Trainer", "RunFolder", "CheckpointHook", "EpochEvalHook", "build_runtime",
           "eval_precision", "use_compile", "run_differences", "CHECKPOINT_NAME"]
