"""The kNN monitor of pretraining (docs/paper.md §5, §8): a hook on the training loop."""
from __future__ import annotations

import logging
import time
from typing import Optional

from .. import distributed as du
from ..config import Config, to_dict
from ..models.factory import build_from_spec
from ..runtime import MetricsWriter
from ..train.checkpoint import backbone_state_from_checkpoint, spec_from_config
from ..train.loop import Hook, Progress
from ..train.run import Runtime
from .knn import knn_evaluate

log = logging.getLogger(__name__)


class KnnMonitor(Hook):
    """The kNN monitor (docs/paper.md §5, §8): the random-init point (``knn_init_top1``), a fine point every
    ``eval.knn_every_steps`` iterations on fixed small subsets (``knn_fine_top1``) and the full bank
    every ``eval.knn_every`` epochs (``knn_top1``). Rank 0 evaluates; the others wait."""

    def __init__(self, cfg: Config, rt: Runtime, data, method, metrics: MetricsWriter,
                 last: Optional[dict] = None):
        self.cfg, self.rt, self.data, self.method, self.metrics, self.last = cfg, rt, data, method, metrics, last
        self.enabled = data.bank is not None
        self.fine_every = cfg.eval.knn_every_steps if self.enabled else 0
        self.full_every = cfg.eval.knn_every if self.enabled else 0

    def _backbone(self):
        """The query backbone to evaluate on rank 0: the module's own, or under FSDP a plain copy built
        from the gathered weights (every rank takes part in the gathering)."""
        if not du.is_sharded(self.method):
            return self.method.backbone
        state = du.full_state_dict(self.method)
        if not du.is_main():
            return None
        backbone = build_from_spec(spec_from_config(to_dict(self.cfg)))
        backbone.load_state_dict(backbone_state_from_checkpoint({"model": state}), strict=True)
        return backbone.to(self.rt.device)

    def _evaluate(self, step: int, fine: bool, key: str) -> Optional[dict]:
        res = None
        backbone = self._backbone()
        if du.is_main():
            t0 = time.time()
            e = self.cfg.eval
            limits = dict(bank_limit=e.knn_fine_bank, test_limit=e.knn_fine_test) if fine else {}
            res = knn_evaluate(backbone, self.data.bank, self.data.test, self.cfg.data, e,
                               self.rt.device, self.rt.precision, **limits)
            rec = {"step": step, "epoch": step / self.data.batches.steps_per_epoch, f"{key}_top1": res["top1"]}
            if not fine:
                rec[f"{key}_top5"] = res["top5"]
            self.metrics.write(rec)
            log.info("kNN (%s) at step %d: top1 %.2f (%.0f s)", key, step, res["top1"], time.time() - t0)
        du.barrier()
        return res

    def initial_point(self) -> None:
        """Step 0: the random-init reference (on the fine subsets unless ``eval.knn_init=full``)."""
        if not self.enabled:
            return
        mode = self.cfg.eval.knn_init if (self.cfg.eval.knn_every > 0 or self.fine_every) else "off"
        if mode != "off":
            res = self._evaluate(0, fine=mode == "subset", key="knn_init")
            if mode == "subset" and self.fine_every and du.is_main():  # the same computation
                self.metrics.write({"step": 0, "epoch": 0.0, "knn_fine_top1": res["top1"]})
        if self.fine_every and mode != "subset":
            self._evaluate(0, fine=True, key="knn_fine")

    def after_step(self, p: Progress, out: dict) -> None:
        if not self.enabled:
            return
        t0 = time.time()
        if self.fine_every and p.step % self.fine_every == 0:
            self._evaluate(p.step, fine=True, key="knn_fine")
        ep = p.step // p.steps_per_epoch
        if p.end_of_epoch and self.cfg.eval.knn_every > 0 and (ep % self.cfg.eval.knn_every == 0
                                                               or p.step == p.total_steps):
            self.last = self._evaluate(p.step, fine=False, key="knn")
        p.eval_seconds += time.time() - t0


__all__ = ["KnnMonitor"]
