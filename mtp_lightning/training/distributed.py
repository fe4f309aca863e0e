"""Training on several processes: the FSDP2 strategy, per-block sharding, activation checkpointing,
compile, sharded checkpoints, and the combinations that are refused up front.

- ``trainer.strategy=fsdp`` is FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's
  ``ModelParallelStrategy``: one data-parallel mesh over every process (tensor-parallel size 1), gloo on
  a CPU and NCCL on GPUs. ``CPLightningModule.configure_model`` calls ``prepare_model``, which shards
  each transformer ``Block`` (the trunk's, and the heads' with ``model.heads.kind=block``), then the root
  ``CPModel``. The root group holds the embeddings, the final norm and the heads' factor maps.
- The tied embedding is also the unembedding U, which the loss uses outside ``CPModel.forward``. That is
  sound because FSDP2 leaves the root unsharded from its forward until its backward (it does not
  reshard the root after forward), so the loss multiplies by the full U and U's gradient from the loss
  joins the root's reduce-scatter. Decoding in the acceptance callback runs after a validation forward,
  so the root is unsharded there too; each block all-gathers its own weights in its forward hook.
- A Hugging Face trunk (``model.backbone.kind=hf``) is sharded by ``hf_backbone.shard_frozen_backbone``:
  each decoder layer is a unit, then the trunk itself (embeddings, final norm and the output layer U,
  not resharded after its forward), then any ``block`` heads, then the root, which keeps only the
  heads. With a frozen backbone (``train_mode=heads_only``) no unit mixes frozen and trainable
  parameters. Decoding calls the trunk's ``forward``, so its unit gathers U before the heads read it.
  A heads-only checkpoint stores no backbone weights (``checkpoint_io.omit_frozen_backbone``), so
  ``FSDP2Strategy.load_checkpoint`` reads every other key of the folder and leaves the backbone as it
  was loaded from the base model.
- Activation checkpointing and compile wrap each block's ``forward`` on the instance instead of the
  module, so parameter names (and checkpoints) are the same under every strategy and option. Decoding
  (a KV cache) always runs the plain eager forward: its shapes change at every step.
- A sharded checkpoint is a folder: one shard file per rank (torch.distributed.checkpoint) and
  ``meta.pt`` with everything else (the loops, the callbacks, ``checkpoint["mtp_lightning"]``).
  ``checkpoints.sharded.load_sharded_checkpoint`` reads one back in a single process, without a process group, for
  ``--resume last``, ``validate``, ``test`` and ``generate``.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn as nn

from mtp_lightning.config import Config, ModelConfig
from mtp_lightning.checkpoints.sharded import is_sharded_checkpoint, load_sharded_without_frozen_backbone
from mtp_lightning.errors import UserError



# ---- what is refused --------------------------------------------------------------------------------

def check_parallel_config(cfg: Config) -> None:
    """Refuse, in one message, strategy/precision/option combinations that cannot work here."""
    t, m = cfg.trainer, cfg.model
    errors: list[str] = []
    if t.strategy == "fsdp" and t.precision == "16-mixed":
        errors.append("trainer.strategy=fsdp with trainer.precision=16-mixed: Lightning's ModelParallelStrategy "
                      "(FSDP2) has no fp16 loss scaling; use bf16-mixed or 32-true")
    if m.backbone.kind == "hf":
        asked = [key for key, on in (("model.activation_checkpointing=true", m.activation_checkpointing),
                                     ("model.compile=true", m.compile)) if on]
        if asked:
            errors.append(f"{' and '.join(asked)} with model.backbone.kind=hf: checkpointing and compile "
                          f"apply to the gpt trunk's blocks only; turn them off (ddp and fsdp work without "
                          f"them) or use model.backbone.kind=gpt")
    if errors:
        raise UserError("unsupported combination: " + "; ".join(errors))


# ---- the strategy -----------------------------------------------------------------------------------

def fsdp_strategy(cfg: Config):
    """Lightning's ModelParallelStrategy set up as plain FSDP2: every process is one data-parallel shard."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2Strategy(ModelParallelStrategy):
        # ModelParallelStrategy's "auto" sizes put the processes of a node on the tensor-parallel axis;
        # sharding only needs the data-parallel one, sized once the process count is known
        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
            super().setup_environment()

        def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
            # a heads-only checkpoint has no backbone keys, which the stock (strict) load would miss
            path = Path(self.broadcast(checkpoint_path))
            model = getattr(self.lightning_module, "model", None)
            if getattr(model, "backbone_frozen", False) and is_sharded_checkpoint(path):
                return load_sharded_without_frozen_backbone(self.model, self.optimizers, path, weights_only)
            return super().load_checkpoint(path, weights_only)

    on_gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto"
                                                            and torch.cuda.is_available())
    return FSDP2Strategy(process_group_backend="nccl" if on_gpu else "gloo", save_distributed_checkpoint=True)


# ---- model preparation ------------------------------------------------------------------------------

def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer layer of the model (trunk first, then ``block`` heads), in module order."""
    from mtp_lightning.model.gpt import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def _plain(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(block).forward(block, x)


def _checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.utils.checkpoint.checkpoint(type(block).forward, block, x, use_reentrant=False)


_COMPILED: dict = {}  # one compiled function per path, shared by every block (the block is an input)


def _block_forward(self: nn.Module, x: torch.Tensor, cache=None) -> torch.Tensor:
    """A block's forward with its training path checkpointed and/or compiled (``wrap_block_forward``)."""
    if cache is not None:  # decoding: shapes change at every step, and nothing is kept for backward
        return type(self).forward(self, x, cache)
    fn = _checkpointed if self.mtp_checkpoint and torch.is_grad_enabled() else _plain
    if self.mtp_compile:
        if fn not in _COMPILED:
            _COMPILED[fn] = torch.compile(fn)
        fn = _COMPILED[fn]
    return fn(self, x)


def wrap_block_forward(block: nn.Module, checkpoint: bool, compile: bool) -> None:
    """Activation checkpointing and/or torch.compile for the training path of one block.

    The forward is replaced on the instance (a method bound to it, so a deep copy rebinds to the copy),
    so parameter names stay the same, and hooks on the module (FSDP2's all-gather and reshard) still
    run around it. During backward, the recomputation runs the class's eager forward; FSDP2 has
    unsharded the block's weights for backward by then.
    """
    block.mtp_checkpoint, block.mtp_compile = checkpoint, compile
    block.forward = types.MethodType(_block_forward, block)


def prepare_model(model: nn.Module, cfg: ModelConfig, device_mesh=None) -> None:
    """Activation checkpointing, compile, then (given a device mesh) FSDP2 sharding per block and root.

    The order follows torchtitan: checkpointing inside compile inside sharding. A Hugging Face trunk is
    sharded per decoder layer, trunk, ``block`` head and root (``hf_backbone.shard_frozen_backbone``);
    checkpointing and compile are refused for it (``check_parallel_config``).
    """
    blocks = transformer_blocks(model)
    if cfg.activation_checkpointing or cfg.compile:
        for block in blocks:
            wrap_block_forward(block, cfg.activation_checkpointing, cfg.compile)
    if device_mesh is None:
        return
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
    if cfg.backbone.kind == "hf":
        from mtp_lightning.model.hf_backbone import shard_frozen_backbone

        shard_frozen_backbone(model, fully_shard, mesh=mesh)
        return
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
