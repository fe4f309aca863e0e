"""Checkpoints: written atomically, read without executing code, checked against this code.

- Writes go through ``mtp_lightning.atomic``: a temporary file in the same folder, fsynced and renamed
  into place, so a kill or a full disk during a save leaves the previous checkpoint whole, and a full
  disk is one line that says so.
- Reads use ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only. A file
  that would need to run code to unpickle is refused.
- Every checkpoint carries ``checkpoint["mtp_lightning"]``: the format version, the resolved config and
  the tokenizer (as JSON). A checkpoint alone is enough to decode.
- A frozen pretrained backbone (``model.backbone.train_mode=heads_only``) is not stored: its weights
  are dropped from the state dict and ``checkpoint["mtp_lightning"]["base_model"]`` records where it
  comes from (a GGUF backbone: also the resolved file path) and a fingerprint of its weights. Loading
  rebuilds it from there, refuses a base model whose fingerprint differs, and is strict about every
  other key.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mtp_lightning import __version__
from mtp_lightning.atomic import writing
from mtp_lightning.config import Config, load_config, to_dict
from mtp_lightning.errors import UserError

FORMAT_VERSION = 1
META_KEY = "mtp_lightning"
# a frozen backbone's keys in the LightningModule's state dict (CPLightningModule.model is the CPModel)
FROZEN_PREFIX = "model.trunk."


def add_run_metadata(checkpoint: dict, cfg: Config, tokenizer) -> None:
    checkpoint[META_KEY] = {
        "format": FORMAT_VERSION,
        "code_version": __version__,
        "config": to_dict(cfg),
        "tokenizer": tokenizer.to_json(),
    }


def omit_frozen_backbone(checkpoint: dict, trunk, prefix: str = FROZEN_PREFIX) -> None:
    """Drop a frozen pretrained trunk's weights (keys under ``prefix``) and record its base model."""
    state = checkpoint["state_dict"]
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
    base = {"name_or_path": trunk.name_or_path, "fingerprint": trunk.fingerprint()}
    if getattr(trunk, "gguf_file", ""):
        base["gguf_file"] = trunk.gguf_file  # where the name pointed when the heads were trained
    checkpoint[META_KEY]["base_model"] = base


def restore_frozen_backbone(checkpoint: dict, trunk, path, prefix: str = FROZEN_PREFIX) -> dict:
    """``checkpoint["state_dict"]`` completed with the omitted backbone weights, taken from ``trunk``
    (just built from the base model), after checking that it is the base model the heads were
    trained on. A checkpoint that stores its whole model comes back unchanged."""
    base = checkpoint.get(META_KEY, {}).get("base_model")
    if base is None:
        return checkpoint["state_dict"]
    if not hasattr(trunk, "fingerprint"):
        raise UserError(f"checkpoint '{path}' holds only heads for the pretrained model "
                        f"'{base['name_or_path']}', but the model built from its config has no pretrained "
                        f"backbone; keep model.backbone.kind=hf")
    if trunk.fingerprint() != base["fingerprint"]:
        raise UserError(f"checkpoint '{path}' holds heads trained on the base model "
                        f"'{base['name_or_path']}', but the weights now loaded from "
                        f"'{trunk.name_or_path}' differ from that model's"
                        f"{' (trained on file ' + repr(base['gguf_file']) + ')' if base.get('gguf_file') else ''}; "
                        f"point model.backbone.name_or_path at the original base model")
    state = dict(checkpoint["state_dict"])
    for key, value in trunk.state_dict(prefix=prefix).items():
        state.setdefault(key, value)
    return state


CHECKPOINT_FIX = "the previous checkpoint is intact: free space, then continue with `fit --resume last`"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but a save is a rename of a complete, fsynced file
    (``mtp_lightning.atomic``), and a full disk is one ``DiskFull`` line that keeps the old checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with writing(path, what="checkpoint", fix=CHECKPOINT_FIX) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if Path(path).name == ".temp.ckpt":  # ddp_spawn hands the trained weights back as a bare state dict
            return torch.load(path, map_location="cpu", weights_only=True)
        return safe_load(path)


def safe_load(path: str | os.PathLike) -> dict:
    """Load a checkpoint without executing code; every failure is one clear ``UserError``."""
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint (trainer.strategy=fsdp): shards and meta.pt in a folder
        from mtp_lightning.checkpoints.sharded import load_sharded_checkpoint

        return _check_contents(load_sharded_checkpoint(path), path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: '{path}'; pass an existing .ckpt file "
                        f"(runs/<name>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"checkpoint '{path}' holds objects that would run code when loaded; "
                            f"refusing it. Only load checkpoints written by mtp_lightning") from None
        raise UserError(f"checkpoint '{path}' is truncated or corrupted ({type(e).__name__}); use an earlier "
                        f"one from the same checkpoints/ folder") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError) as e:
        raise UserError(f"checkpoint '{path}' is truncated or corrupted ({str(e).splitlines()[0][:80]}); "
                        f"use an earlier one from the same checkpoints/ folder") from None
    return _check_contents(ckpt, path)


def _check_contents(ckpt, path: Path) -> dict:
    if not isinstance(ckpt, dict) or META_KEY not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"'{path}' is not an mtp_lightning checkpoint (no '{META_KEY}' metadata); "
                        f"pass a checkpoint written by `python -m mtp_lightning fit`")
    meta = ckpt[META_KEY]
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"checkpoint '{path}' has format {meta.get('format')!r}, this code reads "
                        f"format {FORMAT_VERSION}; use the mtp_lightning version that wrote it")
    return ckpt


def checkpoint_config(ckpt: dict, overrides: list[str] | None = None) -> Config:
    return load_config(overrides=overrides, base=ckpt[META_KEY]["config"])


def load_for_inference(path: str | os.PathLike, device: str = "cpu"):
    """(CPModel in eval mode, Tokenizer, Config) from a checkpoint file."""
    from mtp_lightning.data.tokenizer import Tokenizer
    from mtp_lightning.model.cp_model import CPModel

    ckpt = safe_load(path)
    cfg = checkpoint_config(ckpt)
    tokenizer = Tokenizer.from_json(ckpt[META_KEY]["tokenizer"])
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    rows = state.get("trunk.wte.weight")
    if rows is not None and rows.shape[0] != tokenizer.vocab_size:
        raise UserError(f"checkpoint '{path}': its tokenizer has {tokenizer.vocab_size} tokens but its model "
                        f"embeds {rows.shape[0]}; the tokenizer does not belong to this checkpoint")
    cfg.model.gpt.vocab_size = tokenizer.vocab_size
    model = CPModel(cfg.model)
    load_state(model, restore_frozen_backbone({**ckpt, "state_dict": state}, model.trunk, path,
                                             prefix=FROZEN_PREFIX.removeprefix("model.")), path)
    return model.to(device).eval(), tokenizer, cfg


def load_state(model: torch.nn.Module, state: dict, path) -> None:
    """load_state_dict with a clear message when the checkpoint's architecture differs."""
    from mtp_lightning.model.heads import split_stacked_weight

    state = dict(state)
    split_stacked_weight(state, "heads.")  # the layout before offset 1 had its own parameter
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {shapes[0]} is {tuple(state[shapes[0]].shape)}, the model expects "
                       f"{tuple(own[shapes[0]].shape)}")
        raise UserError(f"checkpoint '{path}' does not match the model built from its config ({detail}); "
                        f"it was written by a different architecture or code version")
    model.load_state_dict(state)


def load_module_checkpoint(module: torch.nn.Module, ckpt: dict, path) -> None:
    """Load a checkpoint's weights into a ``CPLightningModule``, the frozen backbone restored from the
    base model it was built with; an architecture change is one line instead of Lightning's traceback."""
    load_state(module, restore_frozen_backbone(ckpt, module.model.trunk, path), path)


def newest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """A run's newest complete checkpoint and its contents, or None when none loads.

    ``last.ckpt`` first: training rewrites it at every periodic save, after every validation and on a
    graceful stop (its ModelCheckpoints have no version counter, so there is never a ``last-v1.ckpt``).
    When it is missing or torn by a kill, the other ``*.ckpt`` are tried newest first by modification
    time."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    candidates = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime))
    for c in candidates:
        try:
            return c, safe_load(c)
        except UserError:
            continue
    return None


def find_resume_checkpoint(run_dir: Path) -> Path:
    """``newest_checkpoint``'s path, or a ``UserError`` that says why there is nothing to resume."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not any(ckpt_dir.glob("*.ckpt")):
        raise UserError(f"nothing to resume: no checkpoint in '{ckpt_dir}'; start the run with `fit` "
                        f"(without --resume) or pass --resume PATH to a .ckpt file")
    newest = newest_checkpoint(run_dir)
    if newest is None:
        raise UserError(f"no usable checkpoint in '{ckpt_dir}': every .ckpt there is truncated or not an "
                        f"mtp_lightning checkpoint; pass --resume PATH to a good one")
    return newest[0]
