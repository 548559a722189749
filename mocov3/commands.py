"""The command line's commands and their one-line help, with nothing heavy imported: ``mocov3 --version`` and
``mocov3 --help`` answer from here (:mod:`mocov3.entry`) without importing torch; :mod:`mocov3.cli` builds
its full parser from the same table, so the two cannot drift (tests/test_cli.py compares their help)."""
from __future__ import annotations

import argparse

from .version import __version__

DESCRIPTION = "MoCo v3 self-supervised pretraining of ViTs"

COMMANDS = {
    "pretrain": "self-supervised pretraining",
    "knn": "weighted kNN accuracy of a checkpoint's backbone",
    "linear": "linear probe on the frozen backbone (docs/paper.md §8)",
    "finetune": "end-to-end fine-tuning of a checkpoint's backbone (or from scratch)",
    "sweep": "run a grid of pretraining runs (resumable) and summarize them",
    "report": "PNG figures and a Markdown page from run folders (needs matplotlib)",
    "export": "backbone as safetensors with timm names, config.json and a model card",
    "submit": "run a mocov3 command on SLURM via submitit (one task per GPU, requeued on preemption / timeout): "
              "mocov3 submit [options] -- pretrain ...",
    "shard": "convert any set (an image folder, a Hugging Face dataset, CIFAR, other shards) into shuffled tar "
             "shards (webdataset layout) + index.json",
    "cache": "show the on-disk cache (decoded images, features, downloads) or clear it",
}


def top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """``mocov3``'s own parser (``--version``) and its sub-parser action; the commands are added by the caller."""
    parser = argparse.ArgumentParser(prog="mocov3", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mocov3 {__version__}")
    return parser, parser.add_subparsers(dest="command", required=True)


__all__ = ["DESCRIPTION", "COMMANDS", "top_parser"]
