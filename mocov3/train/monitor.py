"""Per-layer gradient norms and a gradient-spike detector (docs/paper.md §5: the kNN dips follow gradient
spikes that appear first in the patch projection and reach the last layers a few iterations later)."""
from __future__ import annotations

import statistics
from collections import deque
from typing import Optional

import torch
import torch.nn as nn

from .. import distributed as du
from ..models.factory import monitor_groups


def layer_groups(method: nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters of the online encoder, grouped from the input to the output: for a ViT
    ``patch_embed``, ``embeddings``, ``block0`` .. ``blockN``, ``final_norm``; for a ResNet ``stem``,
    ``layer1`` .. ``layer4``; then the method's heads (:meth:`~mocov3.methods.base.Method.heads`)."""
    groups: dict[str, list] = {}
    for name, params in monitor_groups(method.backbone):
        ps = [p for p in params if p.requires_grad]
        if ps:
            groups[name] = ps
    for head, mod in method.heads().items():
        ps = [p for p in mod.parameters() if p.requires_grad]
        if ps:
            groups[head] = ps
    return groups


class GradMonitor:
    """Measures gradient norms per layer group every step (one fused ``_foreach_norm`` per group) and
    flags a spike when a group's norm exceeds ``spike_factor`` times the median of its last ``window``
    values. With several groups spiking at one step, the one closest to the input is reported first."""

    def __init__(self, method: nn.Module, spike_factor: float = 5.0, window: int = 50, min_history: int = 10):
        self.groups = layer_groups(method)
        self.sharded = du.is_sharded(method)  # FSDP: norms of local shards, summed over the ranks
        self._device = du.local_tensors([next(iter(next(iter(self.groups.values()))))])[0].device
        self.spike_factor, self.min_history = spike_factor, min_history
        self.history = {k: deque(maxlen=window) for k in self.groups}
        self._pending: list[tuple[int, torch.Tensor]] = []

    @torch.no_grad()
    def _group_norms(self, grad_scale=None) -> torch.Tensor:
        """Per-group gradient norms as one float32 device tensor [G] (NaN for a group without gradients)."""
        out = self._norms([[p.grad for p in params if p.grad is not None] for params in self.groups.values()])
        return out / grad_scale if grad_scale is not None else out

    def _norms(self, groups: list[list[torch.Tensor]]) -> torch.Tensor:
        """The L2 norm of each list of tensors, [G] float32 (NaN for an empty list); under FSDP the
        squared norms of the local shards are summed over the ranks (one all-reduce)."""
        sq = []
        for tensors in groups:
            if tensors:
                local = du.local_tensors(tensors)
                sq.append(torch.stack(torch._foreach_norm(local)).float().square().sum())
            else:
                sq.append(torch.full((), float("nan"), device=self._device))
        sq = torch.stack(sq)
        if self.sharded:
            du.all_reduce_sum_(sq)
        return sq.sqrt()

    def _as_dict(self, values: list[float]) -> dict[str, float]:
        out = {k: v for k, v in zip(self.groups, values) if v == v}  # NaN: no gradient this step
        out["total"] = sum(v * v for v in out.values()) ** 0.5
        return out

    def norms(self, grad_scale: float = 1.0) -> dict[str, float]:
        """This step's norms, read at once (one device-to-host copy)."""
        return self._as_dict(self._group_norms(grad_scale).tolist())

    def record(self, step: int, grad_scale=None) -> None:
        """Keep step ``step``'s norms on the device (no host synchronization); :meth:`flush` reads them."""
        self._pending.append((step, self._group_norms(grad_scale)))

    def flush(self) -> tuple[Optional[dict], list[tuple[int, dict]]]:
        """Read the recorded steps in one copy, feed them to the spike detector in order. Returns the last
        step's norms and the spikes ``[(step, spike), ...]``."""
        if not self._pending:
            return None, []
        rows = torch.stack([n for _, n in self._pending]).tolist()
        spikes, last = [], None
        for (step, _), row in zip(self._pending, rows):
            last = self._as_dict(row)
            spike = self.observe(last)
            if spike is not None:
                spikes.append((step, spike))
        self._pending.clear()
        return last, spikes

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the monitored weights before an optimizer step (for :meth:`update_ratios`)."""
        self._before = {name: [p.detach().clone() for p in du.local_tensors(params)]
                        for name, params in self.groups.items()}

    @torch.no_grad()
    def update_ratios(self) -> dict[str, float]:
        """``||w_after - w_before|| / ||w_before||`` per group for the step after :meth:`snapshot`
        (empty without a snapshot). Large ratios in the first layer are the other face of a spike."""
        before = getattr(self, "_before", None)
        if not before:
            return {}
        names = list(self.groups)
        diffs = [torch._foreach_sub([p.detach() for p in du.local_tensors(self.groups[n])], before[n]) for n in names]
        dn, wn = self._norms(diffs + [before[n] for n in names]).split(len(names))  # one all-reduce under FSDP
        self._before = None
        return dict(zip(names, (dn / wn.clamp_min(1e-12)).tolist()))

    def state_dict(self) -> dict:
        """The spike detector's recent history, saved in checkpoints so a resumed run flags the same spikes."""
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        for k, vals in state.get("history", {}).items():
            if k in self.history:
                self.history[k].clear()
                self.history[k].extend(float(v) for v in vals)

    def observe(self, norms: dict[str, float]) -> Optional[dict]:
        """Update the history with this step's norms; return the spike (or None)."""
        spiking = []
        for name, hist in self.history.items():
            if name not in norms:
                continue
            v = norms[name]
            if len(hist) >= self.min_history:
                med = statistics.median(hist)
                if med > 0 and v > self.spike_factor * med:
                    spiking.append({"layer": name, "value": v, "median": med, "ratio": v / med})
            hist.append(v)
        if not spiking:
            return None
        return {"first_layer": spiking[0]["layer"], "layers": [s["layer"] for s in spiking],
                "ratio": spiking[0]["ratio"], "value": spiking[0]["value"]}
