"""Sharded (FSDP2) checkpoint folders: one shard file per rank, written by torch.distributed.checkpoint,
and ``meta.pt`` with everything else (the loops, the callbacks, ``checkpoint["mtp_lightning"]``).

``load_sharded_checkpoint`` reads a folder back in a single process, without a process group, for
``--resume last``, ``validate``, ``test`` and decoding; ``load_sharded_without_frozen_backbone`` is the
strategy's own load for a heads-only checkpoint (``training.distributed.FSDP2Strategy``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from mtp_lightning.checkpoints.io import FROZEN_PREFIX
from mtp_lightning.errors import UserError

SHARDED_META = "meta.pt"  # the file Lightning's ModelParallelStrategy writes beside the shards

def load_sharded_without_frozen_backbone(module: nn.Module, optimizers: list, path: Path,
                                         weights_only: bool | None = None) -> dict:
    """``ModelParallelStrategy.load_checkpoint`` for a heads-only checkpoint of a frozen backbone.

    Every key of ``module``'s state dict except the frozen backbone's is read from the folder (strictly:
    a missing one fails the load), and the optimizers' shards are read as the stock load does; the
    backbone keeps the base model's weights it was built with (``train.fit`` has checked their
    fingerprint against the checkpoint's). Returns what ``meta.pt`` holds (loops, callbacks, metadata).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)

    state = {k: v for k, v in get_model_state_dict(module).items() if not k.startswith(FROZEN_PREFIX)}
    wrapped = {"state_dict": state}
    dcp.load(wrapped, checkpoint_id=path)
    result = module.load_state_dict(wrapped["state_dict"], strict=False)
    wrong = [k for k in result.missing_keys if not k.startswith(FROZEN_PREFIX)] + list(result.unexpected_keys)
    if wrong:
        raise UserError(f"sharded checkpoint '{path}' does not match the model ({wrong[:3]}); it was written "
                        f"by a different architecture or code version")
    for idx, optimizer in enumerate(optimizers):
        key = f"optimizer_{idx}"
        optim_state = {key: get_optimizer_state_dict(module, optimizer)}
        dcp.load(optim_state, checkpoint_id=path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / SHARDED_META, map_location="cpu",
                      weights_only=True if weights_only is None else weights_only)


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / SHARDED_META).is_file()


def load_sharded_checkpoint(path: str | os.PathLike) -> dict:
    """A sharded checkpoint folder as one checkpoint dict with full tensors, read in this process alone.

    The optimizer's shards are left out: what needs them (``fit --resume`` under ``trainer.strategy=fsdp``)
    has the strategy read the folder itself.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise UserError(f"checkpoint folder '{path}' has no {SHARDED_META}: it is not a complete sharded "
                        f"checkpoint; use an earlier one from the same checkpoints/ folder")
    try:
        ckpt = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
        reader = dcp.FileSystemReader(str(path))
        entries = reader.read_metadata().state_dict_metadata
        state = {key: torch.empty(md.size, dtype=md.properties.dtype) for key, md in entries.items()
                 if key.startswith("state_dict.") and isinstance(md, TensorStorageMetadata)}
        dcp.load(state, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as e:  # a lost shard, a truncated file: one line
        if isinstance(e, CheckpointException):  # the reader's own error, wrapped per rank
            e = next(iter(e.failures.values()))[0]
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"sharded checkpoint '{path}' cannot be read ({first}); use an earlier one from the "
                        f"same checkpoints/ folder") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"'{path / SHARDED_META}' is not a checkpoint's metadata")
    ckpt["state_dict"] = {key.removeprefix("state_dict."): value for key, value in state.items()}
    return ckpt
