"""A trunk with CP heads: the one model object that training, decoding and checkpoints share.

Training calls ``forward`` (no cache). Decoding calls ``extend`` with a ``KVCache`` and then asks for
only the distributions it needs: ``verifier_logprobs`` at every verified position, and
``factor_logprobs`` for a few offsets at one position per row. Neither ever builds all n*r factors at
every position, which is what makes speculative steps cheap.

The trunk is this project's GPT (``model.backbone.kind=gpt``) or a Hugging Face causal LM
(``kind=hf``, ``hf_backbone.HFTrunk``); both map ids to hidden states z, own the unembedding U and give
a cache with per-row ``lengths`` and ``crop``.

Shape legend: B batch, T positions, D width, n offsets, r experts, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from mtp_lightning.config import ModelConfig
from mtp_lightning.model import fastpath, native
from mtp_lightning.model.draft_vocab import column_of
from mtp_lightning.model.fastpath import skinny_linear
from mtp_lightning.model.gpt import GPT, KVCache, TreeMask
from mtp_lightning.model.heads import CPHeads

if TYPE_CHECKING:
    from mtp_lightning.model.hf_backbone import HFCache


class CPModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone.kind == "hf":
            from mtp_lightning.model.hf_backbone import HFTrunk

            self.trunk = HFTrunk.from_config(cfg.backbone)
            trunk_cfg, first_cache_layer = self.trunk.heads_config(), 0  # head caches live beside HF's
        else:
            self.trunk = GPT(cfg.gpt)
            trunk_cfg, first_cache_layer = cfg.gpt, cfg.gpt.n_layer
        self._max_seq_len = trunk_cfg.max_seq_len
        self.heads = CPHeads(cfg.heads, trunk_cfg, first_cache_layer=first_cache_layer)
        self._draft_rows: tuple | None = None  # decoding's gathered U[draft_ids], see head_unembedding

    @property
    def n_future(self) -> int:
        return self.heads.n

    @property
    def rank(self) -> int:
        return self.heads.r

    @property
    def unembedding(self) -> torch.Tensor:
        return self.trunk.unembedding  # (V, D)

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    # ---- the heads' vocabulary (``draft_vocab.py``) ----------------------------------------------

    @property
    def draft_vocab(self) -> int:
        """V', the heads' draft vocabulary; 0 when they predict over the full vocabulary."""
        return self.heads.draft_vocab

    def head_unembedding(self, other: bool = False) -> torch.Tensor:
        """The rows of U the heads' products use: U (V, D) itself for the full vocabulary, else
        U[draft_ids] (V', D), with the "other" class's row appended (V' + 1, D) when ``other`` (the
        loss). A gather of the shared U, so gradients reach its rows; without autograd (decoding) the
        gathered rows are kept while U and the ids are unchanged, so the decoders' weight copies of it
        (``fastpath``) are made once per generation, not per step."""
        U = self.unembedding
        if not self.draft_vocab:
            return U
        ids = self.heads.draft_ids
        if torch.is_grad_enabled():
            rows = U.index_select(0, ids)  # (V', D)
        else:
            key = (U._version, U.data_ptr(), ids._version, ids.data_ptr(), U.dtype)
            if self._draft_rows is None or self._draft_rows[0] != key:
                # a normal tensor even under inference mode: the weight copies key on its version
                with torch.inference_mode(False), torch.no_grad():
                    self._draft_rows = (key, U.detach().index_select(0, ids))  # (V', D)
            rows = self._draft_rows[1]
        if other:
            rows = torch.cat([rows, self.heads.other_row.to(rows.dtype)[None]])  # (V' + 1, D)
        return rows

    @property
    def head_frozen_rows(self) -> int:
        """Rows of ``head_unembedding(other=True)`` that get no gradient: the V' draft rows of a frozen U
        (heads-only), whose gradient product the loss then skips; 0 otherwise."""
        return self.draft_vocab if self.draft_vocab and not self.unembedding.requires_grad else 0

    def head_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Token ids (...) -> the heads' classes (...): the ids themselves for the full vocabulary, else
        each id's column among the V', and V' ("other") for rarer ids."""
        if not self.draft_vocab:
            return targets
        return column_of(self.heads.draft_ids, self.unembedding.shape[0])[targets]

    def draft_tokens(self, columns: torch.Tensor) -> torch.Tensor:
        """The heads' columns (...) (< V') -> full-vocabulary token ids (...)."""
        return self.heads.draft_ids[columns] if self.draft_vocab else columns

    @property
    def backbone_frozen(self) -> bool:
        """True for a pretrained backbone trained heads-only: its weights never change."""
        return bool(getattr(self.trunk, "frozen", False))

    def lm_logits(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) -> (..., V) logits of the plain next-token head: U z for the GPT trunk, the
        pretrained model's own output layer (bias and logit scaling included) for an HF trunk.
        ``rows`` (V',): only those ids' logits (..., V'), from those rows of the output layer."""
        own = getattr(self.trunk, "lm_logits", None)
        if own is not None:
            return own(z) if rows is None else own(z, rows)
        return skinny_linear(z, self.unembedding if rows is None else self.unembedding[rows])

    def forward(self, idx: torch.Tensor, frozen_trunk: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """idx (B, T) -> z (B, T, D) and the n per-offset head states (B, T, D).

        ``frozen_trunk`` (draft tuning): the trunk runs without autograd and z comes back as a leaf that
        requires grad. Going through this ``forward`` (not ``trunk`` directly) is what gathers the root's
        weights under FSDP2, and an output that requires grad is what makes FSDP2 reduce the heads'
        gradients after the backward."""
        if not frozen_trunk:
            z = self.trunk(idx)
            return z, self.heads.offset_states(z)
        with torch.no_grad():
            z = self.trunk(idx)
        z = z.detach().requires_grad_(torch.is_grad_enabled())
        return z, self.heads.offset_states(z)

    # ---- decoding -------------------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> KVCache | HFCache:
        return self.trunk.new_cache(batch, max_len, extra_layers=self.heads.n_cache_layers)

    def extend(self, idx: torch.Tensor, cache: KVCache, pad_mask: torch.Tensor | None = None,
               tree: TreeMask | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Append idx (B, T) to the cache; return z (B, T, D) and the head states at those positions.
        ``tree``: the T tokens are one row's candidate tree, each seeing only its ancestors."""
        z = self.trunk(idx, cache, pad_mask, tree)
        states = self.heads.offset_states(z, cache)
        cache.advance(idx.shape[1])
        return z, states

    def router_logw(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., r) log router weights, in float32."""
        return self.heads.router_logits(z).float().log_softmax(-1)

    def factor_logprobs(self, states: list[torch.Tensor], offsets: range, probs: bool = False,
                        int8: bool = False, raw: bool = False) -> torch.Tensor:
        """log P_a^(s)(.) for the offsets asked, at the positions the states hold.

        states n x (..., D) -> (..., len(offsets), r, V) float32 log-probabilities (``probs``: the
        probabilities P_a^(s) themselves, one softmax instead of a log-softmax and an exp). One matmul.
        ``int8`` (speculative drafts only, never the verifier): the factor maps and the unembedding
        through int8 weight copies while decoding on the CPU (``fastpath.project_int8``), which read a
        quarter of the bytes; the factors are then approximate. ``raw``: the logits U h, unnormalised
        (the native greedy draft chain normalises them itself).
        The vocabulary is the heads' own (``head_unembedding``): V, or the V' draft ids (columns; map
        them to token ids with ``draft_tokens``).
        """
        first, count = offsets.start, len(offsets)
        if first >= 1 and count > 1 and self.heads.kind != "block":  # draft offsets of one shared state
            h = self.heads.draft_vectors(states[first], first, count, int8)  # (..., k, r, D)
        else:
            h = torch.stack([self.heads.expert_vectors(states[s], s, int8=int8) for s in offsets], dim=-3)  # (..., k, r, D)
        project = fastpath.project_int8 if int8 else fastpath.project
        logits = project(h, self.head_unembedding()).float()  # (..., k, r, V) (V': the draft vocabulary)
        if raw:
            return logits
        return logits.softmax(-1) if probs else logits.log_softmax(-1)

    def fused_greedy_draft(self, u: torch.Tensor, joint1: torch.Tensor, c: torch.Tensor, k: int, ks: int
                           ) -> torch.Tensor | None:
        """Greedy drafts (B, ks) in one native call (``native.greedy_draft``) from the states u (B, D), the
        verifier's router-weighted offset-1 factors joint1 (B, r, V) and the last tokens c (B,), with int8
        draft maps and unembedding: the expert posterior after c, ``factor_logprobs(int8=True, raw=True)``
        and the greedy chain, without the torch ops in between. One row only (a batch is better served by
        the step-by-step path, whose products take all its rows at once). None where it does not apply
        (no kernel, a batch, other head kinds or shapes, outside ``decoding()``): the caller then takes
        the step-by-step path."""
        heads = self.heads
        if (u.shape[0] != 1 or native._lib is None or heads.kind == "block" or heads.draft_weight is None
                or not fastpath.applies(u) or u.dtype != torch.float32 or heads.draft_weight.dtype != torch.float32
                or self.unembedding.dtype != torch.float32 or self.draft_vocab  # joint1 comes from marginal
                or not native.chain_supports((ks, self.rank, self.unembedding.shape[0]))):
            return None
        maps = fastpath._copy(heads.draft_weight, slice(0, k), "n8")
        unemb = fastpath._copy(self.unembedding, None, "n8")
        if maps is None or unemb is None:
            return None
        return native.greedy_draft(u, joint1, c, maps, unemb, k, ks, self.rank, heads.kind == "mlp")

    def verifier_logprobs(self, z: torch.Tensor, states: list[torch.Tensor], verifier: str) -> torch.Tensor:
        """The next-token distribution p(. | context) as log-probs (..., V).

        ``marginal``: sum_a w_a P_a^(1), the model's own offset-1 marginal (the paper's setting).
        ``lm_head``: a plain next-token head, softmax(``lm_logits(z)``): for an HF backbone exactly the
        base model's own next-token distribution.
        """
        return self.verifier_and_factors(z, states, verifier)[0]

    def verifier_and_factors(self, z: torch.Tensor, states: list[torch.Tensor], verifier: str,
                             probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``verifier_logprobs`` (..., V) and, for ``marginal``, the offset-1 factors log P_a^(1)
        (..., r, V) it is built from (None for ``lm_head``). Speculative decoding reuses them as the
        first factor of its next draft instead of recomputing them.

        ``probs`` (greedy decoding, which needs only an argmax): probabilities instead, for ``marginal``,
        and the factors come weighted by the router, w_a P_a^(1) (..., r, V), the joint of expert and
        token: the marginal is their sum over a, and a greedy draft's expert posterior after token c is
        their column c, so it needs no router call of its own. The mixture is then a weighted sum, with
        no log-softmax or logaddexp over the vocabulary. ``lm_head`` gives its log-probs either way.
        Both decoders use the same setting, so their greedy tokens come from the same arithmetic."""
        if verifier == "lm_head":
            return self.lm_logits(z).float().log_softmax(-1), None
        if self.draft_vocab:
            raise ValueError(f"the marginal verifier needs the heads' full vocabulary, but they predict over a "
                             f"draft vocabulary of {self.draft_vocab} tokens (model.heads.draft_vocab); verify "
                             f"with lm_head")
        logw = self.router_logw(z)  # (..., r)
        if probs and native._lib is not None and native.supports(self.unembedding.shape[0]) and fastpath.applies(z):
            # decoding on the CPU with the kernel: softmax, weighting and sum over experts in one pass
            return native.mixture(self.factor_logprobs(states, range(1), raw=True)[..., 0, :, :], logw.exp())
        f1 = self.factor_logprobs(states, range(1), probs)[..., 0, :, :]  # (..., r, V)
        if probs:
            joint = f1 * logw.exp()[..., None]  # (..., r, V)
            # elementwise over a few experts: a reduction over the short, strided expert axis costs
            # more on the CPU, and the result does not depend on how many positions are batched
            out = joint[..., 0, :]
            for a in range(1, self.rank):
                out = out + joint[..., a, :]
            return out, joint
        joint = logw[..., None] + f1  # (..., r, V)
        if self.rank > 4:
            return torch.logsumexp(joint, dim=-2), f1  # (..., V), (..., r, V)
        # the same sum over a few experts as a chain of elementwise logaddexp: a reduction over the
        # short, strided expert axis costs 2-4x more on the CPU, and decoding does this every step
        out = joint[..., 0, :]
        for a in range(1, self.rank):
            out = torch.logaddexp(out, joint[..., a, :])
        return out, f1
