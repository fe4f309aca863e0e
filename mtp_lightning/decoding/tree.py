"""Tree verification for self-speculative decoding with CP heads: greedy, one row (``spec.tree``).

A rank-r CP head gives, at the position of the last emitted token c, r coherent continuations: with
the expert posterior concentrated on expert a, the draft distribution at offset s is q_s = P_a^(s), so
expert a's own greedy chain is d_s = argmax P_a^(s). The chain decoder (``speculative.py``) verifies
only the mixture's greedy chain. Here each step:
1. builds a prefix tree of candidates (``build_tree``, a pure function of the posterior after c and the
   factors at this one position): the mixture's greedy chain, the own chains of the experts most
   probable after c, then the mixture's next top tokens at each offset as branches off its chain;
   shared prefixes are merged, and nodes are admitted in that order until the node budget is spent;
2. feeds c and every node in ONE ``extend`` with a ``TreeMask``: a node attends to the cached prefix
   and its own ancestors, and sits at the position of its depth;
3. from c, follows the child equal to the verifier's argmax at each node (``DraftTree.accept``): the
   tokens on that path plus the verifier's argmax at its last node are emitted, m + 1 tokens as in a
   chain step that accepted the same m drafts;
4. moves the kept nodes' keys/values into contiguous slots and drops the rest (the caches' ``keep``);
   the next step starts from the state at the last kept node, taken from the same pass.

Greedy output is AR's token for token whatever the tree: every emitted token is the verifier's argmax
after the emitted tokens before it, computed with exactly those tokens as its context. The tree only
decides how many of them one pass yields. Sampling over a tree and batches are not implemented: both
are refused with a message.

Which candidate won: the source of the deepest accepted node, i.e. the first candidate (in admission
order) that put it in the tree; ``NONE`` when no draft was accepted. ``source_names`` names them.

Shape legend: N draft nodes, T = N + 1 fed tokens (c first), k depth, r experts, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mtp_lightning.config import TreeConfig
from mtp_lightning.decoding.autoregressive import prefill, prepare_prompts, sync
from mtp_lightning.decoding.sampling import GREEDY, Sampling
from mtp_lightning.decoding.speculative import (SpecGeneration, _at, resolve_draft_len,
                                                resolve_draft_precision)
from mtp_lightning.model import fastpath
from mtp_lightning.model.gpt import TreeMask

NONE = -1
"""The winner of a step that accepted no draft."""


def source_names(rank: int) -> list[str]:
    """Names of the candidate sources 0..r+1: the mixture chain, each expert's chain, a top-k branch."""
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
    (``marginal``), or None (``lm_head``): offset 1 and the router are then computed here."""
    if joint1 is None:
        f = model.factor_logprobs(st, range(k + 1), probs=True, int8=int8)[0]  # (k+1, r, V)
        joint, f = f[0] * model.router_logw(zt)[0].exp()[:, None], f[1:]
    else:
        joint, f = joint1[0], model.factor_logprobs(st, range(1, k + 1), probs=True, int8=int8)[0]  # (k, r, V)
    # a probability that underflowed to 0 for every expert must not zero the posterior
    return joint[:, c].clamp_min(torch.finfo(joint.dtype).tiny), f


@dataclass
class TreeGeneration(SpecGeneration):
    tree_sizes: list[list[int]]
    """Per row, the draft nodes N verified by each step."""
    winners: list[list[int]]
    """Per row, each step's winning source (``source_names``; ``NONE``: no draft accepted)."""
    rank: int


def tree_depth(model, draft_len: int, tree: TreeConfig) -> int:
    """The deepest draft offset of the trees, which is their draft length: ``tree.depth``, else
    ``draft_len`` (0: n_future - 1)."""
    return resolve_draft_len(model, tree.depth or draft_len)


def tree_summary(gens: list[TreeGeneration]) -> dict:
    """Tree sizes and the winners' histogram over every step of ``gens``, for ``bench`` and logs."""
    sizes = [n for g in gens for row in g.tree_sizes for n in row]
    names = ["none"] + source_names(gens[0].rank) if gens else ["none"]
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
    arguments and the same token bookkeeping (accepted m, drafted = depth, fewer near the end)."""
    if not sampling.greedy:
        raise ValueError(f"tree verification is greedy only (temperature={sampling.temperature}); "
                         f"decode with temperature 0 or set spec.tree.enabled=false")
    if sync_done is not None:
        raise ValueError("tree verification runs on one process (no sync_done); set spec.tree.enabled=false "
                         "for multi-process decoding")
    B = prompts.shape[0] if isinstance(prompts, torch.Tensor) else len(prompts)
    if B != 1:
        raise ValueError(f"tree verification decodes one row at a time, got a batch of {B}; decode the "
                         f"rows one by one or set spec.tree.enabled=false")
    k = tree_depth(model, draft_len, tree)
    idx, pad_mask, slots = prepare_prompts(model, prompts, pad_mask, max_new_tokens, verifier, tree.budget)
    device = idx.device
    int8 = resolve_draft_precision(draft_precision, device)
    experts = min(tree.experts, model.rank)
    with torch.inference_mode(), fastpath.decoding():
        sync(device)
        t0 = time.perf_counter()
        cache, zt, st, lp1, c = prefill(model, idx, pad_mask, slots, verifier, GREEDY, None)
        c = int(c[0])
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
            dtree = DraftTree()
            if ks > 0:
                pi, probs = _factors(model, zt, st, lp1, c, ks, int8)
                dtree = build_tree(pi, probs, tree.width, experts, tree.budget)
            fed = torch.tensor([[c] + dtree.tokens], device=device)  # (1, T)
            z, states = model.extend(fed, cache, tree=dtree.mask(device))  # (1, T, D)
            logp, lp1 = model.verifier_and_factors(z, states, verifier, probs=True)  # (1, T, V), (1, T, r, V)
            target = logp[0].argmax(-1).tolist()  # (T,): one sync
            path = dtree.accept(target)
            last = path[-1] if path else 0
            cache.keep(filled, torch.tensor([0] + path, device=device) + filled)
            filled += 1 + len(path)
            zt, st = _at(z, states, slice(None), last, len(states))  # (1, D)
            lp1 = None if lp1 is None else lp1[:, last]  # (1, r, V)
            out = [dtree.tokens[i - 1] for i in path] + [target[last]]
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
                          model.rank)
