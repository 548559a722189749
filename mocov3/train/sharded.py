"""Sharded checkpoints for ``train.strategy=fsdp``: every rank writes its own shards of the model and
optimizer tensors into one folder with ``torch.distributed.checkpoint`` (DCP), so no rank ever holds the
full state (a ViT-H run would otherwise gather ~10 GB on rank 0).

The folder lies beside the run's ``checkpoint.pt``, which stays a small plain file (config, step, RNG,
optimizer hyper-parameters) naming it under ``"sharded"``; :func:`mocov3.train.checkpoint.load_checkpoint`
follows the name, so every command reads either kind. The folder holds tensors only: DCP reads non-tensor
entries with full pickle, and its metadata file is a pickle, which we read with an unpickler that admits
only DCP's own metadata classes (``SafeReader``). Reading with another number of ranks reshards (DCP).

A folder is written under a temporary name and renamed when complete; the pointer file is replaced after
that, so a run killed while saving keeps its previous checkpoint (and the next start removes the remnant).
"""
from __future__ import annotations

import contextlib
import logging
import pickle
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .. import distributed as du
from ..runtime import CheckpointError, MocoError, StorageError, first_line

log = logging.getLogger(__name__)

SUFFIX = ".dcp"
_META_CLASSES = {"Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "StorageMeta",
                 "MetadataIndex", "_MEM_FORMAT_ENCODING"}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` admitting only the classes such a file holds (no code can run)."""

    def find_class(self, module: str, name: str):
        ok = ((module == "torch.distributed.checkpoint.metadata" and name in _META_CLASSES)
              or (module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo")
              or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
              or (module == "torch.serialization" and name == "_get_layout")
              or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))
              or (module == "collections" and name == "OrderedDict"))
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")
        return super().find_class(module, name)


def _reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            path = Path(folder) / (".metadata" if rank is None else f"__{rank}.metadata")  # DCP's names
            with open(path, "rb") as f:
                try:
                    md = _MetadataUnpickler(f).load()
                except pickle.UnpicklingError as e:
                    raise CheckpointError(f"{folder}: {e} (not a mocov3 sharded checkpoint)") from None
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = getattr(self, "load_id", None)
            bad = [k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
            if bad:
                raise CheckpointError(f"{folder} holds non-tensor entries ({bad[0]}); not written by mocov3")
            return md

    return SafeReader(str(folder))


@contextlib.contextmanager
def _dcp_errors(what: str, folder: Path):
    """DCP raises ``CheckpointException`` (a BaseException, with every rank's traceback): one line instead,
    a :class:`StorageError` for a failed write, a :class:`CheckpointError` for a failed read."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        failures = getattr(e, "failures", {}) or {}
        inner = next(iter(failures.values()), None)
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, MocoError):
            raise inner from None
        why = f"{type(inner).__name__}: {first_line(inner)}" if inner is not None else first_line(e)
        if what == "write":
            raise StorageError(f"cannot write the sharded checkpoint {folder}: {why}") from None
        raise CheckpointError(f"cannot read the shards in {folder}: {why}") from None


def _split(optim_sd: dict) -> tuple[dict, list]:
    """A (sharded) FQN-layout optimizer state dict -> (tensor state, param_groups); refuses non-tensors."""
    state = optim_sd.get("state", {})
    for fqn, s in state.items():
        for k, v in s.items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"optimizer state {fqn}.{k} is not a tensor; a sharded checkpoint holds "
                                      f"tensors only (use train.checkpoint_format=full)")
    return state, optim_sd.get("param_groups", [])


def new_folder(run_dir: Path, step: int) -> Path:
    """The folder for this step's shards, named alike on every rank: ``checkpoint-stepNNNNNNNNN.dcp``, or
    with ``-2``, ``-3``... when that name exists (a resumed run saving the step it resumed from must not
    replace the folder its checkpoint still names)."""
    def name(n: int) -> Path:
        return Path(run_dir) / f"checkpoint-step{step:09d}{'' if n == 1 else f'-{n}'}{SUFFIX}"

    n = 1
    if du.is_main():
        while name(n).exists():
            n += 1
    return name(du.broadcast_int(n))


def save(module: nn.Module, optimizer, folder: Path) -> list:
    """Every rank: write this rank's shards of the model and optimizer tensors into ``folder`` (created
    under a temporary name, renamed when complete). Returns the optimizer's param_groups (FQN layout,
    hyper-parameters) for the pointer file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if du.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    du.barrier()
    state, groups = _split(get_optimizer_state_dict(module, optimizer))
    with _dcp_errors("write", folder):
        dcp.save({"model": get_model_state_dict(module), "optim": state}, checkpoint_id=str(tmp))
    du.barrier()  # every rank's files are in place
    if du.is_main():
        tmp.rename(folder)  # a fresh name (new_folder): never over a folder a checkpoint names
    return groups


def check_folder(folder: Path, pointer: Path) -> None:
    if not (Path(folder) / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {pointer} keeps its tensors in {folder}, which is missing or incomplete "
                              f"(copy the folder together with the .pt file)")


def load_full(folder: Path, with_optimizer: bool) -> tuple[dict, dict]:
    """Read a sharded checkpoint whole into this process (CPU tensors, no collectives; any number of
    ranks may do it at once): (model state dict, optimizer tensor state in FQN layout)."""
    import torch.distributed.checkpoint as dcp

    try:
        md = _reader(folder).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot read the shards in {folder}: {type(e).__name__}: {first_line(e)}") from None
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
            if k.startswith("model.") or (with_optimizer and k.startswith("optim."))}
    with _dcp_errors("read", folder):
        dcp.load(flat, storage_reader=_reader(folder), no_dist=True)
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    optim: dict = {}
    for k, v in flat.items():
        if k.startswith("optim."):
            fqn, name = k[len("optim."):].rsplit(".", 1)
            optim.setdefault(fqn, {})[name] = v
    return model, optim


def load_into(module: nn.Module, optimizer, folder: Path, param_groups: list) -> None:
    """Every rank of a sharded run: read its own shards of ``folder`` in place (DCP reshards when the
    checkpoint was written by another number of ranks) and load them into the module and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    model = get_model_state_dict(module)
    state, _ = _split(get_optimizer_state_dict(module, optimizer))
    with _dcp_errors("read", folder):
        dcp.load({"model": model, "optim": state}, storage_reader=_reader(folder))
    set_model_state_dict(module, model)
    set_optimizer_state_dict(module, optimizer, {"state": state, "param_groups": param_groups})


def referenced(run_dir: Path) -> Optional[set[str]]:
    """Names of the shard folders the checkpoint files in ``run_dir`` point at; None when a pointer cannot be
    read (it may point at any of them: nothing may be removed then)."""
    names = set()
    for p in Path(run_dir).glob("checkpoint*.pt"):
        try:
            ck = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - unreadable: what it references is unknown
            return None
        if isinstance(ck, dict) and isinstance(ck.get("sharded"), dict):
            names.add(str(ck["sharded"].get("folder")))
    return names


def remove_unreferenced(run_dir: Path) -> None:
    """Shard folders no checkpoint file points at (superseded ones, remnants of a killed save). Nothing is
    removed while a checkpoint file of the folder cannot be read."""
    keep = referenced(run_dir)
    if keep is None:
        log.warning("a checkpoint file in %s cannot be read: its shard folders are kept", run_dir)
        return
    for d in list(Path(run_dir).glob(f"*{SUFFIX}")) + list(Path(run_dir).glob(f".*{SUFFIX}.tmp")):
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)
