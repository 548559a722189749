"""Where metrics records go besides ``metrics.jsonl``: TensorBoard and Weights & Biases.

Each sink receives every record that :class:`mocov3.runtime.MetricsWriter` appends (losses, lr, momentum,
kNN points, per-layer gradient norms, spike events, mfu, the ``start`` record), on rank 0 only. Both
packages are optional: asking for a sink whose package is missing is a one-line :class:`ConfigError`
before training starts.

W&B: the run id is kept in ``<run folder>/wandb_id``, so a resumed run (after a crash, a requeue or a
torchrun restart) continues the same W&B run. Records are logged with ``step`` as their x axis
(``define_metric("*", step_metric="step")``): the lines a resume replays after its checkpoint's step
land on the same x values instead of being refused as going backwards. ``WANDB_MODE=offline`` logs to
``<run folder>/wandb/`` for a later ``wandb sync``.
"""
from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Optional, Protocol

from .runtime import ConfigError, first_line, storage_error

WANDB_ID_FILE = "wandb_id"


class Sink(Protocol):
    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Numeric fields as scalars, ``step`` as the x axis."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)") \
                from None
        self.writer = SummaryWriter(str(log_dir))

    def log(self, record: dict) -> None:
        for k, v in flatten(record).items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Mirrors every record to one W&B run, resumed by the id stored in the run folder."""

    def __init__(self, run_dir: Path, project: str, name: Optional[str], config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.wandb=true needs the wandb package (pip install 'mocov3[wandb]')") from None
        run_dir = Path(run_dir)
        run_id = wandb_run_id(run_dir)
        try:
            self.run = wandb.init(project=project, name=name or run_dir.resolve().name, id=run_id, resume="allow",
                                  dir=str(run_dir), config=config, reinit="create_new")
            self.run.define_metric("epoch", step_metric="step")
            self.run.define_metric("*", step_metric="step")
        except Exception as e:  # noqa: BLE001 - wandb's own errors (no API key, no network, ...)
            raise ConfigError(f"train.wandb: W&B did not start ({first_line(e)}); log in with `wandb login`, "
                              f"or set WANDB_MODE=offline to log into the run folder and `wandb sync` later") from None

    def log(self, record: dict) -> None:
        # W&B drops NaN / inf silently in charts; keep them visible as strings (a non-finite loss matters)
        self.run.log({k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                      for k, v in flatten(record).items() if v is not None})

    def close(self) -> None:
        self.run.finish()


def flatten(record: dict, prefix: str = "") -> dict:
    """Nested dicts as ``a/b`` keys (``grad_norm/block3``): one W&B chart section per group."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder: read from ``wandb_id``, or made and written there first."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        run_id = path.read_text().strip()
        if run_id.isalnum():
            return run_id
    run_id = secrets.token_hex(4)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise storage_error("write", path, e) from None
    return run_id


def open_sinks(run_dir: Path, train_cfg, config: dict, main: bool) -> list:
    """The sinks ``train.tensorboard`` / ``train.wandb`` ask for (none on ranks other than 0)."""
    if not main:
        return []
    sinks = []
    if train_cfg.tensorboard:
        sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard"))
    if train_cfg.wandb:
        sinks.append(WandbSink(Path(run_dir), train_cfg.wandb_project, train_cfg.wandb_name or None, config))
    return sinks
