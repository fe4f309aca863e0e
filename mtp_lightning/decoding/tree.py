"""Tree verification for self-speculative decoding with CP heads, greedy or sampled, one row
(``spec.tree``).

A rank-r CP head gives, at the position of the last emitted token c, r coherent continuations: with
the expert posterior concentrated on expert a, the draft distribution at offset s is q_s = P_a^(s), so
expert a's own greedy chain is d_s = argmax P_a^(s). The chain decoder (``speculative.py``) verifies
only the mixture's chain. Here each step:
1. builds a prefix tree of candidates from the posterior after c and the factors at this one position
   (``build_tree`` when greedy, ``tree_sampling.draw_tree`` when sampling);
2. feeds c and every node in ONE ``extend`` with a ``TreeMask``: a node attends to the cached prefix
   and its own ancestors, and sits at the position of its depth;
3. walks the tree from c, keeping a path of nodes (greedy: ``DraftTree.accept``; sampled:
   ``tree_sampling.walk``); the path's tokens plus one token of the verifier at its last node are
   emitted, m + 1 tokens as in a chain step that accepted the same m drafts;
4. moves the kept nodes' keys/values into contiguous slots and drops the rest (the caches' ``keep``);
   the next step starts from the state at the last kept node, taken from the same pass.

Greedy. The tree: the mixture's greedy chain, the own chains of the experts most probable after c,
then the mixture's next top tokens at each offset as branches off its chain; shared prefixes merged,
nodes admitted in that order until the node budget is spent. From c, the walk follows the child equal
to the verifier's argmax at each node and ends with the argmax at its last node. Output is AR's token
for token whatever the tree: every emitted token is the verifier's argmax after the emitted tokens
before it, computed with exactly those tokens as its context. The tree only decides how many of them
one pass yields.

Sampled (temperature > 0, top-k / top-p): the emitted tokens have exactly the distribution of AR
sampling with the same warped verifier; the tree, its draws and its verification are in
``tree_sampling.py``, with the proof.

Batches are not implemented: they are refused with a message.

Which candidate won: the source of the deepest accepted node, i.e. the first candidate (in admission
order) that put it in the tree; ``NONE`` when no draft was accepted. ``source_names`` names them.

Shape legend: N draft nodes, T = N + 1 fed tokens (c first), k depth, r experts, V vocabulary,
n internal nodes (nodes with candidates), m most candidates of a node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mtp_lightning.config import TreeConfig
from mtp_lightning.decoding.autoregressive import prefill, prepare_prompts, sync
from mtp_lightning.decoding.sampling import GREEDY, Sampling, sample, warp_logprobs
from mtp_lightning.decoding.speculative import (SpecGeneration, _at, _columns, resolve_draft_len,
                                                resolve_draft_precision)
from mtp_lightning.model import fastpath
from mtp_lightning.model.gpt import TreeMask

NONE = -1
"""The winner of a step that accepted no draft."""


def source_names(rank: int, sampled: bool = False) -> list[str]:
    """Names of the candidate sources 0..r+1. Greedy: the mixture chain, each expert's chain, a top-k
    branch. Sampled: the main chain, the extra chains 1..r (``tree_sampling.sampled_shape``), a branch."""
    if sampled:
        return ["mixture"] + [f"chain{e}" for e in range(1, rank + 1)] + ["branch"]
    return ["mixture"] + [f"expert{a}" for a in range(rank)] + ["topk"]


@dataclass
class DraftTree:
    """A prefix tree of draft tokens under the root c. Node i (1-based: its index in the fed sequence,
    c being 0) has ``tokens[i-1]``, ``parents[i-1]`` (0: the root) and ``depths[i-1]`` (1 = offset 2);
    a parent always comes before its children. ``sources[i-1]``: which candidate added the node."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    children: dict[tuple[int, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, path: list[int], source: int, budget: int) -> bool:
        """Merge a candidate (tokens after c) into the tree; False once the budget of N nodes ran out
        before the whole path was in (its admitted prefix stays)."""
        node = 0
        for depth, token in enumerate(path, start=1):
            child = self.children.get((node, token))
            if child is None:
                if len(self.tokens) >= budget:
                    return False
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(depth)
                self.sources.append(source)
                child = self.children[(node, token)] = len(self.tokens)
            node = child
        return True

    def mask(self, device: torch.device | str = "cpu") -> TreeMask:
        """Which fed tokens each fed token sees, (T, T) bool (itself and its ancestors), and depths (T,)."""
        T = len(self.tokens) + 1
        anc = torch.zeros(T, T, dtype=torch.bool)
        anc[0, 0] = True
        for i, p in enumerate(self.parents, start=1):
            anc[i] = anc[p]
            anc[i, i] = True
        return TreeMask(anc.to(device), torch.tensor([0] + self.depths, device=device))

    def accept(self, target: list[int]) -> list[int]:
        """The verifier's argmax at every fed token (T,) -> the accepted nodes, root to leaf (fed indices):
        from the root, the child whose token is the argmax at its parent, as long as there is one."""
        path, node = [], 0
        while (node, target[node]) in self.children:
            node = self.children[(node, target[node])]
            path.append(node)
        return path

    def winner(self, path: list[int]) -> int:
        return self.sources[path[-1] - 1] if path else NONE


def build_tree(pi: torch.Tensor, probs: torch.Tensor, width: int, experts: int, budget: int) -> DraftTree:
    """The candidate tree of one step from the expert posterior after c, pi (r,) (unnormalised), and
    the factor probabilities at offsets 2..k+1, probs (k, r, V). Candidates, in admission order:
    - source 0: the mixture's greedy chain d_s = argmax_x sum_a pi_a P_a^(s)(x), pi <- pi P^(s)(d_s)
      (the chain decoder's draft);
    - source 1 + a: expert a's own chain argmax P_a^(s), for the ``experts`` largest pi_a, largest first;
    - source r + 1: for s = 1..k, the next ``width - 1`` tokens of that mixture's q_s, as d_1..d_{s-1}
      followed by the token.

    Worked example (r = 2, k = 2, V = 4, width 2, experts 1, budget 4): pi = (0.3, 0.7), expert 0 puts
    its mass on tokens 1 then 2, expert 1 on 3 then 0. The mixture picks 3 (q_1 = 0.3 at 1, 0.7 at 3),
    the posterior moves onto expert 1, and it picks 0: chain [3, 0]. Expert 1's chain is the same
    (merged, no node); expert 0 is not among the top 1. The branches: [1] (q_1's second token), then
    [3, 2]: nodes 3, 0, 1, 2 with parents 0, 1, 0, 1.
    """
    k, r, _ = probs.shape
    tiny = torch.finfo(probs.dtype).tiny
    post = (pi / pi.sum()).to(probs.dtype)  # (r,)
    chain, tops = [], []
    for s in range(k):
        q = post @ probs[s]  # (V,)
        d = q.argmax()
        chain.append(d)
        tops.append(q.topk(min(width, q.numel())).indices)  # (width,)
        post = post * probs[s, :, d].clamp_min(tiny)
        post = post / post.sum()
    order = torch.sort(pi, descending=True, stable=True).indices[:min(experts, r)]  # (e,)
    own = probs.argmax(-1).T[order]  # (e, k): each chosen expert's own chain
    e, w = order.numel(), tops[0].numel()
    # one host transfer for everything the tree is made of
    flat = torch.cat([torch.stack(chain), torch.stack(tops).reshape(-1), own.reshape(-1), order]).tolist()
    chain_ids, base = flat[:k], k + k * w
    top_ids = [flat[k + s * w:k + (s + 1) * w] for s in range(k)]
    own_ids = [flat[base + i * k:base + (i + 1) * k] for i in range(e)]
    order_ids = flat[base + e * k:]

    candidates = [(chain_ids, 0)] + [(path, 1 + a) for path, a in zip(own_ids, order_ids)]
    for s in range(k):
        others = [x for x in top_ids[s] if x != chain_ids[s]][:width - 1]
        candidates += [(chain_ids[:s] + [x], r + 1) for x in others]
    tree = DraftTree()
    for path, source in candidates:
        if not tree.add(path, source, budget):
            break
    return tree


def _factors(model, zt: torch.Tensor, st: list[torch.Tensor], joint1: torch.Tensor | None, c: int, k: int,
             int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior after c, w_a P_a^(1)(c) (r,), and the factor probabilities at offsets 2..k+1
    (k, r, V) at this one position. ``joint1``: the verifier's router-weighted offset-1 factors (1, r, V)
    (``marginal``), or None (``lm_head``): offset 1 and the router are then computed here. With a draft
    vocabulary the factors cover its V' columns, and a c outside it leaves the router's weights."""
    if joint1 is None:
        f = model.factor_logprobs(st, range(k + 1), probs=True, int8=int8)[0]  # (k+1, r, V)
        joint, f = f[0] * model.router_logw(zt)[0].exp()[:, None], f[1:]
    else:
        joint, f = joint1[0], model.factor_logprobs(st, range(1, k + 1), probs=True, int8=int8)[0]  # (k, r, V)
    col, inside = _columns(model, torch.tensor([c], device=f.device))
    pi = joint[:, col[0]]
    if inside is not None and not bool(inside[0]):
        pi = model.router_logw(zt)[0].exp()
    # a probability that underflowed to 0 for every expert must not zero the posterior
    return pi.clamp_min(torch.finfo(joint.dtype).tiny), f


def _to_ids(model, tree: DraftTree) -> DraftTree:
    """A greedy tree built over a draft vocabulary's columns -> the same tree over token ids."""
    ids = model.heads.draft_ids.tolist()
    tree.tokens = [ids[t] for t in tree.tokens]
    tree.children = {(node, ids[t]): child for (node, t), child in tree.children.items()}
    return tree


@dataclass
class TreeGeneration(SpecGeneration):
    tree_sizes: list[list[int]]
    """Per row, the draft nodes N verified by each step."""
    winners: list[list[int]]
    """Per row, each step's winning source (``source_names``; ``NONE``: no draft accepted)."""
    rank: int
    sampled: bool = False
    """Sampled trees name their sources differently (``source_names``)."""


def tree_depth(model, draft_len: int, tree: TreeConfig) -> int:
    """The deepest draft offset of the trees, which is their draft length: ``tree.depth``, else
    ``draft_len`` (0: n_future - 1)."""
    return resolve_draft_len(model, tree.depth or draft_len)


def tree_summary(gens: list[TreeGeneration]) -> dict:
    """Tree sizes and the winners' histogram over every step of ``gens``, for ``bench`` and logs."""
    sizes = [n for g in gens for row in g.tree_sizes for n in row]
    names = ["none"] + source_names(gens[0].rank, gens[0].sampled) if gens else ["none"]
    counts = dict.fromkeys(names, 0)
    for g in gens:
        for row in g.winners:
            for w in row:
                counts[names[w + 1]] += 1
    return {"mean_size": sum(sizes) / max(len(sizes), 1), "max_size": max(sizes, default=0),
            "winners": counts}


def generate_tree(model, prompts, max_new_tokens: int, tree: TreeConfig, *, pad_mask: torch.Tensor | None = None,
                  verifier: str = "marginal", draft_len: int = 0, sampling: Sampling = GREEDY,
                  draft_precision: str = "auto", generator: torch.Generator | None = None,
                  eos_id: int | None = None, on_step=None, sync_done=None) -> TreeGeneration:
    """``generate_speculative`` with a tree of candidates per step (module docstring); the same
    arguments and the same token bookkeeping (accepted m, drafted = depth, fewer near the end).
    Sampling (``sampling`` not greedy) draws the trees and the tokens from ``generator``, so a seeded
    generator makes a run reproducible."""
    if sync_done is not None:
        raise ValueError("tree verification runs on one process (no sync_done); set spec.tree.enabled=false "
                         "for multi-process decoding")
    B = prompts.shape[0] if isinstance(prompts, torch.Tensor) else len(prompts)
    if B != 1:
        raise ValueError(f"tree verification decodes one row at a time, got a batch of {B}; decode the "
                         f"rows one by one or set spec.tree.enabled=false")
    from mtp_lightning.decoding import tree_sampling  # it builds on DraftTree (this module)

    k = tree_depth(model, draft_len, tree)
    idx, pad_mask, slots = prepare_prompts(model, prompts, pad_mask, max_new_tokens, verifier, tree.budget)
    device = idx.device
    int8 = resolve_draft_precision(draft_precision, device)
    experts = min(tree.experts, model.rank)
    with torch.inference_mode(), fastpath.decoding():
        sync(device)
        t0 = time.perf_counter()
        greedy = sampling.greedy
        cache, zt, st, lp1, c = prefill(model, idx, pad_mask, slots, verifier, sampling, generator)
        c = int(c[0])
        if not greedy:
            shape = tree_sampling.sampled_shape(tree.width, experts, k, tree.budget, model.rank)
            draft_ids = model.heads.draft_ids if getattr(model, "draft_vocab", 0) else None
            V = model.unembedding.shape[0]
        sync(device)
        t_prefill = time.perf_counter() - t0
        tokens = [c]
        if on_step is not None:
            on_step([[c]])
        filled = idx.shape[1]  # cache slots in use (the row's slots: padding included)
        accepted, drafted, sizes, winners = [], [], [], []
        alive = max_new_tokens > 1 and c != eos_id
        while alive:
            ks = min(k, max_new_tokens - len(tokens) - 1)
            dtree, drawn = DraftTree(), None
            if ks > 0 and greedy:
                pi, probs = _factors(model, zt, st, lp1, c, ks, int8)
                dtree = build_tree(pi, probs, tree.width, experts, tree.budget)
                if getattr(model, "draft_vocab", 0):
                    dtree = _to_ids(model, dtree)
            elif ks > 0:
                # all k offsets: one weight copy
                logpi, probs = tree_sampling.posterior(model, zt, st, lp1, c, k, int8)
                step_shape = (shape if ks == k else
                              tree_sampling.sampled_shape(tree.width, experts, ks, tree.budget, model.rank))
                drawn = tree_sampling.draw_tree(step_shape, logpi, probs, sampling, generator, draft_ids, V)
                dtree = drawn.tree
            fed = torch.tensor([[c] + dtree.tokens], device=device)  # (1, T)
            z, states = model.extend(fed, cache, tree=dtree.mask(device))  # (1, T, D)
            logp, lp1 = model.verifier_and_factors(z, states, verifier, probs=greedy)  # (1, T, V), (1, T, r, V)
            if greedy:
                target = logp[0].argmax(-1).tolist()  # (T,): one sync
                path = dtree.accept(target)
                final = target[path[-1] if path else 0]
            elif drawn is None:  # nothing to draft: one token from p
                path, final = [], int(sample(warp_logprobs(logp[0, 0], sampling), generator))
            else:
                path, final = tree_sampling.walk(drawn, warp_logprobs(logp[0], sampling), generator)
            last = path[-1] if path else 0
            cache.keep(filled, torch.tensor([0] + path, device=device) + filled)
            filled += 1 + len(path)
            zt, st = _at(z, states, slice(None), last, len(states))  # (1, D)
            lp1 = None if lp1 is None else lp1[:, last]  # (1, r, V)
            out = [dtree.tokens[i - 1] for i in path] + [final]
            m, kd = len(path), ks
            if eos_id is not None and eos_id in out:
                # cut at the eos as AR stops there; an accepted eos ends the step as the chain's does
                out = out[: out.index(eos_id) + 1]
                if len(out) <= m:
                    m = kd = len(out) - 1
                alive = False
            c = out[-1]
            accepted.append(m)
            drafted.append(kd)
            sizes.append(len(dtree))
            winners.append(dtree.winner(path[:m]))
            tokens.extend(out)
            assert len(tokens) <= max_new_tokens
            alive = alive and len(tokens) < max_new_tokens
            if on_step is not None:
                on_step([out])
        sync(device)
        seconds = time.perf_counter() - t0
    return TreeGeneration([tokens], seconds, t_prefill, len(accepted), [accepted], [drafted], [sizes], [winners],
                          model.rank, not sampling.greedy)
