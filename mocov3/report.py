"""Figures and a Markdown page from run folders' ``metrics.jsonl`` (matplotlib, imported only here).

* ``knn.png``: kNN top-1 vs. epoch, one line per run (the paper's batch / lr / optimizer figures);
* ``grad_<run>.png``: gradient norm of the first trainable layer vs. the rest of the encoder per
  iteration, detected spikes marked, the kNN curve beneath (the paper's spike figure, §5);
* ``train_<run>.png``: loss, lr and momentum;
* ``report.md``: the figures and a summary table (final / best kNN, dips, spikes).
"""
from __future__ import annotations

from pathlib import Path

from .folders import claim, write_atomic
from .runtime import ConfigError, DataError, read_metrics
from .sweep import SUMMARY_COLUMNS, format_cell, run_config, summarize_run


def _load(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    if not f.is_file():
        raise DataError(f"{run} has no metrics.jsonl (not a run folder?)")
    return read_metrics(f)


def _first_layer(norms: dict) -> str:
    """The first trainable layer group of the monitor's norms (they are ordered input to output)."""
    return next(k for k in norms if k != "total")


def first_layer_label(name: str, pos_embed: str = "learned") -> str:
    """A legend label that says which layer the first trainable group is (``pos_embed``: the run's
    ``model.pos_embed``; a sin-cos or absent position embedding is not trained, so the group is the class token)."""
    if name == "patch_embed":
        return "patch projection (first layer)"
    if name == "embeddings":
        what = "class token + position embedding" if pos_embed == "learned" else "class token"
        return f"{what} (first trainable; patch projection frozen)"
    if name == "stem":
        return "stem (first layer)"
    return f"{name} (first trainable layer)"


def _resumes(lines: list[dict], key: str) -> list:
    return [l[key] for l in lines if l.get("event") == "resume" and l.get(key) is not None]


def run_labels(runs: list[Path]) -> list[str]:
    """Folder names, prefixed by their parent folder where two runs share a name (sweeps of other configs)."""
    names = [Path(r).resolve().name for r in runs]
    return [f"{Path(r).resolve().parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]


def make_report(runs: list[Path], output: Path, per_run_figures: bool = True) -> Path:
    """Figures and ``report.md`` for ``runs`` in ``output``; ``per_run_figures=False`` keeps only the
    shared kNN figure (and the table)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("mocov3 report needs matplotlib (pip install 'mocov3[plot]')") from None
    data = {label: _load(Path(r)) for label, r in zip(run_labels(runs), runs)}
    configs = {label: run_config(Path(r)) for label, r in zip(run_labels(runs), runs)}
    claim(output, "report", what="report folder")  # the runs are read first: a bad one writes nothing
    figs = []

    fig, ax = plt.subplots(figsize=(10, 4))
    for name, lines in data.items():
        fine = [(l["epoch"], l["knn_fine_top1"]) for l in lines if "knn_fine_top1" in l]
        pts = [(l["epoch"], l["knn_top1"]) for l in lines if "knn_top1" in l]
        init = [(l["epoch"], l["knn_init_top1"]) for l in lines if "knn_init_top1" in l]
        color = None
        if fine:  # the fine curve (small bank) as a line, the full-bank points as markers of the same colour
            line, = ax.plot(*zip(*fine), lw=1.2, label=f"{name} (fine, small bank)")
            color = line.get_color()
            if pts:
                ax.plot(*zip(*pts), "o", ms=4, color=color)
        elif pts:
            line, = ax.plot(*zip(*pts), marker="o", ms=3, label=name)
            color = line.get_color()
        if init:  # the random-init reference: a hollow marker at epoch 0
            ax.plot(*zip(*init), "o", ms=6, mfc="none", color=color,
                    label=None if color else f"{name} (random init only: no kNN point after training yet)")
        for epoch in _resumes(lines, "epoch"):
            ax.axvline(epoch, color=color or "gray", ls=":", lw=1, alpha=0.7)
    # what the markers mean, once: the hollow one is the same network before any step (its own bank and test
    # images, as the points after training), the dotted lines where a run was resumed
    handles, labels = ax.get_legend_handles_labels()
    inits = {(configs[n].get("eval") or {}).get("knn_init", "subset") for n, lines in data.items()
             if any("knn_init_top1" in l for l in lines)}
    if inits:  # eval.knn_init: measured on the fine curve's small bank and test subset, or on the full ones
        where = {"subset": "on the fine curve's subsets", "full": "on the full bank and test set"}
        handles.append(plt.Line2D([], [], marker="o", mfc="none", color="gray", ls=""))
        labels.append("random init (epoch 0, " + " / ".join(where.get(i, i) for i in sorted(inits)) + ")")
    if any(_resumes(lines, "epoch") for lines in data.values()):
        handles.append(plt.Line2D([], [], color="gray", ls=":"))
        labels.append("resumed here")
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(output / "knn.png", dpi=120)
    plt.close(fig)
    figs.append(("kNN accuracy", "knn.png"))

    for name, lines in data.items():
        if not per_run_figures:
            break
        train = [l for l in lines if "loss" in l]
        grads = [l for l in train if "grad_norm" in l]
        if grads:
            first = _first_layer(grads[0]["grad_norm"])
            fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
            steps = [l["step"] for l in grads]
            pos = (configs[name].get("model") or {}).get("pos_embed", "learned")
            a1.plot(steps, [l["grad_norm"].get(first, float("nan")) for l in grads],
                    label=first_layer_label(first, pos))
            names = list(grads[0]["grad_norm"])
            blocks = [k for k in names if k.startswith(("block", "layer"))]
            if blocks:  # the paper's figure: the first layer against the last one
                last = blocks[-1]
                a1.plot(steps, [l["grad_norm"].get(last, float("nan")) for l in grads], label=f"{last} (last block)",
                        alpha=0.8)
            a1.plot(steps, [l["grad_norm"]["total"] for l in grads], label="whole model", alpha=0.5, lw=0.8)
            for s in (l for l in lines if "spike" in l):
                a1.axvline(s["step"], color="red", alpha=0.3, lw=1)
            for step in _resumes(lines, "step"):
                for a in (a1, a2):
                    a.axvline(step, color="gray", ls=":", lw=1)
            a1.set_yscale("log")
            a1.set_ylabel("gradient norm")
            a1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not on them
            knn = [(l["step"], l["knn_fine_top1"]) for l in lines if "knn_fine_top1" in l] or \
                [(l["step"], l["knn_top1"]) for l in lines if "knn_top1" in l]
            if knn:
                a2.plot(*zip(*knn), marker="o", ms=2, color="black")
            a2.set_ylabel("kNN top-1 (%)")
            a2.set_xlabel("iteration")
            fig.tight_layout()
            fig.savefig(output / f"grad_{name.replace('/', '_')}.png", dpi=120)
            plt.close(fig)
            figs.append((f"{name}: gradient norms (spikes in red) and kNN", f"grad_{name.replace('/', '_')}.png"))
        if train:
            fig, axes = plt.subplots(1, 3, figsize=(11, 3))
            for ax, key in zip(axes, ("loss", "lr", "momentum")):
                ax.plot([l["step"] for l in train], [l[key] for l in train])
                ax.set_title(key)
                ax.set_xlabel("iteration")
            fig.tight_layout()
            fig.savefig(output / f"train_{name.replace('/', '_')}.png", dpi=100)
            plt.close(fig)
            figs.append((f"{name}: loss, lr, momentum", f"train_{name.replace('/', '_')}.png"))

    rows = [{**summarize_run(Path(r)), "run": label} for label, r in zip(run_labels(runs), runs)]
    cols = ["run"] + SUMMARY_COLUMNS
    md = ["# Run report", "", "`epoch` is how far a run got (of `epochs` planned); `init_knn` is the random-init "
          "reference point, `final_knn` the last kNN point after training started (- when there is none yet).", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(format_cell(r.get(c)) for c in cols) + " |" for r in rows]
    for title, f in figs:
        md += ["", f"## {title}", "", f"![{title}]({f})"]
    write_atomic(output / "report.md", "\n".join(md) + "\n")
    return output / "report.md"
