"""A Hugging Face causal LM as the trunk of a ``CPModel`` (``model.backbone.kind=hf``).

``HFTrunk`` offers what ``CPModel`` uses from the GPT trunk: ``forward(idx, cache, pad_mask) -> z``,
``unembedding``, ``max_seq_len`` and ``new_cache``, plus ``lm_logits(z)``, the model's own output layer.
What is particular about it:
- z is the base model's last hidden state (``base_model(...).last_hidden_state``: after the final norm
  for GPT-2 and Llama). The CP factors use U = the output layer's weight, the same tensor, not a copy:
  heads-only training shares the base model's (frozen) unembedding, joint training updates it.
- ``lm_logits`` applies the output layer exactly as the model's own forward does (bias and the known
  logit scalings included). A probe at load time checks this against ``model(ids).logits`` and refuses
  a model whose logits cannot be rebuilt from z, because the ``lm_head`` verifier must be the base
  model's next-token distribution for speculative decoding to reproduce it.
- Frozen (``train_mode=heads_only``): no parameter needs a gradient and the model stays in eval mode
  (no dropout) even when Lightning calls ``.train()``.
- Decoding uses the library's ``DynamicCache`` through ``HFCache``, which gives it the per-row
  ``lengths`` and ``crop`` the speculative decoder needs (see there).
- ``transformers`` is imported only here, on first use; without it the user gets one line saying how
  to install it.

Shape legend: B batch, T new tokens, P physical cache slots, D width, V vocabulary.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from mtp_lightning.config import BackboneConfig, GPTConfig
from mtp_lightning.errors import UserError
from mtp_lightning.model.gpt import KVCache, TreeMask

INSTALL_HINT = "model.backbone.kind=hf needs transformers: pip install 'mtp_lightning[hf]'"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return transformers


def load_causal_lm(name_or_path: str) -> nn.Module:
    """``AutoModelForCausalLM`` in float32 from a local folder, a hub id or a GGUF file
    (``gguf_backbone``); one clear error otherwise.

    A hub id is tried only when the hub answers a TCP probe within seconds (``data.hub``); without a
    network only the local HF cache is used, so an unreachable id fails at once instead of retrying.
    """
    from mtp_lightning.model import gguf_backbone

    if gguf_backbone.is_gguf(name_or_path):
        return gguf_backbone.load_gguf_causal_lm(name_or_path)
    transformers = require_transformers()
    from mtp_lightning.data.hub import offline_unless_reachable

    local = Path(name_or_path).expanduser()
    # transformers 5 calls the argument ``dtype``; 4.x called it ``torch_dtype``
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {dtype_kw: torch.float32}
    why = ""
    try:
        with quiet_transformers(transformers):
            if local.is_dir():
                return transformers.AutoModelForCausalLM.from_pretrained(str(local), **kwargs)
            with offline_unless_reachable() as why:
                return transformers.AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except UserError:
        raise
    except Exception as e:  # missing folder files, unknown architecture, network, missing repo
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        where = "local folder" if local.is_dir() else "hub id"
        reason = f"{why}; {first}" if why else first
        raise UserError(f"model.backbone.name_or_path='{name_or_path}' ({where}) cannot be loaded as a "
                        f"causal LM ({reason}); give a folder written by save_pretrained or a reachable "
                        f"hub id") from None


@contextmanager
def quiet_transformers(transformers):
    """A user does not need the loader's advisory notes and per-shard progress bars."""
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


class HFCache:
    """A ``DynamicCache`` with one logical length per row, for batched speculative decoding.

    ``DynamicCache.crop`` cuts every row to one length, but rows of a batch accept different numbers of
    drafts. So every pass appends its T slots to all rows (physical slots are shared), and each row
    keeps a mask of the slots it ``owns``: ``crop(lengths)`` disowns a row's slots beyond its new
    length and physically cuts only the tail that no row owns any more. Disowned slots in the middle
    are holes that the 2-D attention mask hides; positions count a row's real tokens, so holes and
    left padding do not shift them. With batch 1 there are never holes and this is a plain crop.

    Block heads (layers of this project that attend over past positions) keep their keys and values
    in a ``KVCache`` of logical slots beside it; ``write`` and ``mask`` serve them.
    """

    def __init__(self, kv, batch: int, max_len: int, device: torch.device, heads: KVCache | None = None):
        self.kv = kv
        self.max_len = max_len
        self.owned = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # (B, P)
        self.real = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # (B, P) False: padding
        self.heads = heads

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) slots each row holds, padding included (as ``KVCache.lengths``)."""
        return self.owned.sum(1)

    def prepare(self, pad_mask: torch.Tensor, tree: TreeMask | None = None, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append T slots per row; return the 2-D attention mask (B, P+T) and positions (B, T).

        ``tree`` (one row): a 4-D additive mask (1, 1, T, P+T) in ``dtype`` instead, in which the new
        tokens see the owned slots and their own ancestors, and positions by depth. transformers takes
        a 4-D mask as given, for every attention implementation that takes a mask."""
        B, T = pad_mask.shape
        if int(self.lengths.max()) + T > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} slots is full")
        self.owned = torch.cat([self.owned, torch.ones_like(pad_mask)], 1)
        self.real = torch.cat([self.real, pad_mask], 1)
        attend = self.owned & self.real  # (B, P+T)
        positions = (attend.long().cumsum(1) - 1).clamp(min=0)[:, -T:]  # (B, T)
        if self.heads is not None:
            self.heads.prepare(pad_mask, tree)
        if tree is None:
            return attend.long(), positions
        assert B == 1, "a tree pass verifies one row"
        see = torch.cat([attend[:, None, :-T].expand(B, T, -1), tree.ancestors[None]], 2)  # (1, T, P+T)
        mask = torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill_(~see, torch.finfo(dtype).min)
        return mask[:, None], positions[:, :1] + tree.depth[None]  # (1, 1, T, P+T), (1, T)

    def keep(self, first: int, slots: torch.Tensor) -> None:
        """One row: move the slots ``slots`` (n,), ascending and >= first, to first..first+n-1 and
        drop everything after them (``KVCache.keep``). Layers that hold every slot (``DynamicLayer``)."""
        n = slots.numel()
        for layer in self.kv.layers:
            layer.keys[..., first:first + n, :] = layer.keys[..., slots, :]
            layer.values[..., first:first + n, :] = layer.values[..., slots, :]
        self.real[:, first:first + n] = self.real[:, slots]
        if self.heads is not None:
            self.heads.keep(first, slots)
        self.crop(torch.full_like(self.lengths, first + n))

    def advance(self, n_new: int) -> None:
        if self.heads is not None:
            self.heads.advance(n_new)

    def crop(self, lengths: torch.Tensor) -> None:
        """Keep only the first ``lengths[b]`` slots of each row (B,)."""
        assert bool((lengths <= self.lengths).all()), "crop can only shorten the cache"
        rank = self.owned.long().cumsum(1)  # (B, P) 1-based index of each owned slot in its row
        self.owned &= rank <= lengths[:, None]
        used = self.owned.any(0).nonzero()
        keep = int(used.max()) + 1 if used.numel() else 0
        drop = self.owned.shape[1] - keep
        if drop:
            self.kv.crop(-drop)  # a negative count removes that many slots (transformers 4.x and 5.x)
            self.owned, self.real = self.owned[:, :keep], self.real[:, :keep]
        if self.heads is not None:
            self.heads.crop(lengths)

    # the block heads' side: their Blocks call ``write`` and read ``mask``
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads.write(layer, k, v)

    @property
    def mask(self) -> torch.Tensor:
        return self.heads.mask


class HFTrunk(nn.Module):
    """Token ids (B, T) -> the causal LM's last hidden state z (B, T, D)."""

    def __init__(self, lm: nn.Module, frozen: bool, name_or_path: str = ""):
        super().__init__()
        self.lm = lm
        self.frozen = frozen
        self.name_or_path = name_or_path
        self.gguf_file = ""
        """The resolved path of a GGUF backbone's file ('' for folders and hub ids)."""
        self._fingerprint = ""
        if frozen:
            lm.requires_grad_(False)
            lm.eval()
        params = inspect.signature(lm.base_model.forward).parameters
        # transformers 5 names the cache argument ``cache``; 4.x ``past_key_values``
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._check_lm_logits()

    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> HFTrunk:
        from mtp_lightning.model.gguf_backbone import is_gguf, resolve_gguf

        trunk = cls(load_causal_lm(cfg.name_or_path), frozen=cfg.train_mode == "heads_only",
                    name_or_path=cfg.name_or_path)
        if is_gguf(cfg.name_or_path):
            trunk.gguf_file = str(resolve_gguf(cfg.name_or_path).resolve())
        return trunk

    def train(self, mode: bool = True) -> HFTrunk:
        # a frozen backbone stays in eval mode (no dropout) whatever Lightning asks of the module tree
        return super().train(mode and not self.frozen)

    # ---- what CPModel uses --------------------------------------------------------------------

    @property
    def base(self) -> nn.Module:
        """The model without its output layer (GPT2Model, LlamaModel, ...)."""
        return self.lm.base_model

    @property
    def output_layer(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    @property
    def unembedding(self) -> torch.Tensor:
        return self.output_layer.weight  # (V, D): tied to the model's own output layer

    @property
    def vocab_size(self) -> int:
        return self.unembedding.shape[0]

    @property
    def d_model(self) -> int:
        return self.unembedding.shape[1]

    @property
    def max_seq_len(self) -> int:
        c = self.lm.config
        return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 1 << 20)

    def heads_config(self) -> GPTConfig:
        """The trunk description ``CPHeads`` needs: width, and heads/bias for ``block`` heads."""
        c = self.lm.config
        n_head = int(getattr(c, "num_attention_heads", None) or getattr(c, "n_head", 1))
        return GPTConfig(n_layer=int(getattr(c, "num_hidden_layers", 0) or 0), n_head=n_head,
                         d_model=self.d_model, max_seq_len=self.max_seq_len, dropout=0.0, bias=False,
                         vocab_size=self.vocab_size)

    def lm_logits(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) -> (..., V): the base model's own next-token logits from its last hidden state.
        ``rows`` (V',): those ids' logits only (..., V'), from those rows of the output layer (the
        scalings below act on each logit alone, so a subset is exact)."""
        layer = self.output_layer
        if rows is None:
            logits = layer(z)  # the layer's bias, if any, included
        else:
            bias = getattr(layer, "bias", None)
            logits = nn.functional.linear(z, layer.weight[rows], None if bias is None else bias[rows])
        c = self.lm.config
        # the few architectures that transform logits after the output layer in their forward
        if getattr(c, "logit_scale", None) is not None:  # Cohere
            logits = logits * c.logit_scale
        if getattr(c, "logits_scaling", None) is not None:  # Granite
            logits = logits / c.logits_scaling
        cap = getattr(c, "final_logit_softcapping", None)  # Gemma 2/3
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def new_cache(self, batch: int, max_len: int, extra_layers: int = 0, dtype=None) -> HFCache:
        from transformers import DynamicCache

        p = self.unembedding
        max_len = min(max_len, self.max_seq_len)
        heads = None
        if extra_layers:
            hc = self.heads_config()
            heads = KVCache(extra_layers, batch, hc.n_head, max_len, hc.d_model // hc.n_head, p.device,
                            dtype or p.dtype)
        try:
            kv = DynamicCache(config=self.lm.config)
        except TypeError:  # transformers 4.x before caches took a config
            kv = DynamicCache()
        return HFCache(kv, batch, max_len, p.device, heads)

    def forward(self, idx: torch.Tensor, cache: HFCache | None = None,
                pad_mask: torch.Tensor | None = None, tree: TreeMask | None = None) -> torch.Tensor:
        B, T = idx.shape
        if cache is None:
            if T > self.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds the model's {self.max_seq_len} positions")
            # training windows hold no padding (an end-of-text id that doubles as the pad id is a real
            # token); saying so explicitly keeps the library from guessing and warning
            out = self.base(input_ids=idx, attention_mask=torch.ones_like(idx), use_cache=False)
            return out.last_hidden_state  # (B, T, D)
        pad_mask = torch.ones_like(idx, dtype=torch.bool) if pad_mask is None else pad_mask
        # (B, P+T), or for a tree (1, 1, T, P+T); positions (B, T)
        attention_mask, positions = cache.prepare(pad_mask, tree, self.unembedding.dtype)
        out = self.base(input_ids=idx, attention_mask=attention_mask, position_ids=positions,
                        use_cache=True, **{self._cache_kw: cache.kv})
        return out.last_hidden_state  # (B, T, D)

    # ---- checks and identity ------------------------------------------------------------------

    def _check_lm_logits(self) -> None:
        """Refuse a model whose own logits ``lm_logits(z)`` does not reproduce (8-token probe)."""
        ids = torch.arange(1, 9, device=self.unembedding.device)[None] % self.vocab_size  # (1, 8)
        was_training = self.lm.training
        self.lm.eval()
        try:
            with torch.no_grad():
                want = self.lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
                got = self.lm_logits(self(ids)).float()
        finally:
            self.lm.train(was_training)
        if want.shape != got.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise UserError(f"model.backbone.name_or_path='{self.name_or_path}' ({type(self.lm).__name__}) "
                            f"computes its logits in a way this adapter does not reproduce from the last "
                            f"hidden state; speculative decoding could not match it, so it is not supported")

    def fingerprint(self) -> str:
        """A cheap identity of the weights: names, shapes and a few values of every parameter.
        Stored in checkpoints that omit the frozen backbone, to catch a changed base model."""
        if self.frozen and self._fingerprint:
            return self._fingerprint  # frozen weights never change: hash them once
        h = hashlib.blake2b(digest_size=8)
        for name, p in self.lm.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:16], flat[-16:]]).to("cpu", torch.float64)
            h.update(f"{name}:{tuple(p.shape)}:".encode())
            h.update(sample.numpy().tobytes())
        self._fingerprint = h.hexdigest()
        return self._fingerprint


def fsdp_units(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """The modules of a ``CPModel`` with an ``HFTrunk`` to wrap as FSDP units, innermost first, each
    with whether it holds U (the output layer's weight, which the heads read directly).

    Each decoder layer (the model's own ``_no_split_modules`` classes) is a unit; then the ``HFTrunk``
    itself, which keeps what the layers leave: the embeddings, the final norm and the output layer (a
    tied weight is one parameter there). Its ``forward`` is what both training (``CPModel.forward``) and
    decoding (``CPModel.extend``) call, so it gathers U before the heads, the loss or ``lm_logits`` read
    it. Then each transformer layer of ``block`` heads. The rest of the heads stays in the root unit
    (the ``CPModel``), whose forward is the one the training step calls and which is not resharded
    after it, so the loss can read the heads' weights directly. With a frozen backbone every unit, the
    root included, holds only frozen or only trainable parameters of its own, never both
    (``check_units``).
    """
    from mtp_lightning.model.gpt import Block

    lm = model.trunk.lm
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [(m, False) for m in lm.base_model.modules() if type(m).__name__ in names]
    head_blocks = [(m, False) for m in model.heads.modules() if isinstance(m, Block)]
    return layers + [(model.trunk, True)] + head_blocks


def shard_frozen_backbone(model: nn.Module, fully_shard: Callable[..., nn.Module], **kwargs) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` (with its mesh and policies in ``kwargs``) per ``fsdp_units``, then
    to the root; ``distributed.prepare_model`` calls it under ``trainer.strategy=fsdp``.

    The unit holding U is not resharded after its forward: the heads, the loss and ``lm_logits`` read
    U as a plain tensor after the trunk ran (in training, until the backward reshards it; in
    decoding, each ``extend`` runs the trunk's forward first). A frozen backbone's fingerprint is
    taken before sharding (checkpoints record it; the sharded weights are DTensors).

    A frozen trunk's output z needs no gradient, and with ``linear``/``mlp`` heads nothing else that
    an FSDP unit returns does (those heads run in the loss, outside any unit's forward). FSDP2 would
    then never queue the callback that reduce-scatters gradients after the backward, and the sharded
    heads would never get theirs. So in training z is handed on as a leaf that requires grad: the
    backward also computes dL/dz (one product of the heads' size; nothing runs back through the
    backbone), and FSDP2's hooks fire. ``block`` heads are units whose outputs need gradients already."""
    frozen = getattr(model, "backbone_frozen", False)
    if frozen:
        model.trunk.fingerprint()  # cached: frozen weights never change
    units = fsdp_units(model)
    check_units([u for u, _ in units] + [model])
    for unit, holds_u in units:
        fully_shard(unit, **{**kwargs, **({"reshard_after_forward": False} if holds_u else {})})
    if frozen and model.heads.kind != "block":  # before FSDP2's post-forward hook, which hooks z's backward
        model.trunk.register_forward_hook(_z_requires_grad, prepend=True)
    return fully_shard(model, **kwargs)


def _z_requires_grad(module: nn.Module, args, z: torch.Tensor) -> torch.Tensor:
    """Forward hook of a sharded frozen trunk: z as a leaf that requires grad, in training only."""
    if torch.is_grad_enabled() and not z.requires_grad:
        return z.detach().requires_grad_()
    return z


def check_units(units: list[nn.Module]) -> None:
    """Assert that no unit (innermost first) mixes frozen and trainable parameters of its own, i.e.
    outside the units before it."""
    claimed: set[int] = set()
    for unit in units:
        own = [p for p in unit.parameters() if id(p) not in claimed]
        kinds = {p.requires_grad for p in own}
        assert len(kinds) <= 1, f"FSDP unit {type(unit).__name__} mixes frozen and trainable parameters"
        claimed.update(id(p) for p in own)

