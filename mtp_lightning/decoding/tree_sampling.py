"""Sampled tree verification (``spec.tree`` at temperature > 0): the tree's shape, its draws from the
CP mixture, and multi-candidate rejection sampling over it. ``tree.py``'s ``generate_tree`` runs the
steps (one pass with a tree mask, the cache's ``keep``), greedy or sampled.

The emitted tokens (temperature > 0, top-k / top-p) have exactly the distribution of AR sampling with
the same warped verifier.

*The tree.* Its shape is fixed before anything is drawn (``sampled_shape``): a node is named by its
path of draw ranks, e.g. (0, 1) is the second candidate drawn under the first candidate of the root.
In admission order, up to the budget: the main chain (0), (0, 0), .. to the depth; ``experts`` more
chains (e), (e, 0), (e, 0, 0), .. for e = 1..experts; then ``width - 1`` more candidates at each node
of the main chain, (0..0, j) for j < width (those already in are merged). The tokens are then drawn
level by level: the children of a node v are drawn WITHOUT replacement from the draft's conditional at
v, q_v = warp(sum_a pi_a(v) P_a^(s)), s the offset of v's children and pi(v) the expert posterior after
c and v's path (pi_a(v) ∝ pi_a(parent) P_a^(s-1)(v's token)); rank j is the (j+1)-th draw. Drawing all
of a node's children at once is the Gumbel-top-k trick (``draw_without_replacement``): the j largest of
log q(x) - log E_x, E_x ~ Exp(1), in order, are a sequence of j draws without replacement. Where q_v
has fewer tokens than ranks (top-k, top-p, a tiny vocabulary), the missing ranks and their subtrees
are dropped: a node's number of candidates is a function of its own path only. Under the mixture, a
chain that starts with another token than the main chain's follows the experts that predict that
token, so the extra chains are the sampled counterpart of the greedy tree's expert chains.

*The verification* (``rejection_stages``, multi-candidate rejection sampling without replacement).
At a node v with verifier distribution p (warped as in AR) and candidates x_1..x_w drawn from q:
start with p_0 = p, q_0 = q; for j = 1..w accept x_j with probability min(1, p_{j-1}(x_j) / q_{j-1}(x_j));
on a rejection set p_j = normalise(max(p_{j-1} - q_{j-1}, 0)) and q_j = q_{j-1} with x_j set to 0,
renormalised (the distribution x_{j+1} was drawn from). An accepted x_j: descend into it and repeat
there; at a node without candidates the step ends with a bonus token from p; when every candidate of
a node is rejected the step ends with a token from the last residual p_w.

*Why it is exact.* Claim: given the candidates x_1..x_{j-1} already rejected at v, stages j..w and
the residual emit a token distributed as p_{j-1}. For j = w + 1 it is the residual draw itself. Step:
x_j is drawn from q_{j-1}, independently of the uniforms used so far; it is emitted with probability
q_{j-1}(x) min(1, p_{j-1}(x) / q_{j-1}(x)) = min(p_{j-1}(x), q_{j-1}(x)), and stage j rejects with
probability 1 - sum_x min(p_{j-1}, q_{j-1}) = sum_x max(p_{j-1} - q_{j-1}, 0) = Z. p_j does not depend
on which token was rejected (only q_j does), so by the claim for j + 1 the rest emits p_j whatever x_j
was, and the total is min(p_{j-1}, q_{j-1}) + Z max(p_{j-1} - q_{j-1}, 0) / Z = p_{j-1}. With j = 1:
the token emitted at v is distributed as p_v, the verifier's distribution after v's path. (A rejected
token leaves p_j with no mass on it, since rejection needs p_{j-1}(x) < q_{j-1}(x), so a tried token is
never emitted by a later stage; if Z = 0, p_{j-1} = q_{j-1} and stage j accepts surely.) Descending:
the children of an accepted x were drawn from q_x with fresh randomness, independent of the uniforms at
v and of v's other candidates given x, and their number depends on x's path only, so the claim holds
at x with p_x, the verifier after v's path and x. By induction over the emitted tokens, each one has
the verifier's distribution given the tokens before it, which is AR sampling; the next step starts
from that context, as a chain step does. Any q gives exactness (the warp on q and int8 drafts only
change acceptance); what matters is that the acceptance uses the very q each candidate was drawn
from. The unit test ``test_rejection_stages_emit_p_exactly`` enumerates every candidate sequence and
accept/reject event and recovers p to 1e-6; keeping q unchanged after each draw (the update that suits
i.i.d. draws) while drawing without replacement does not.

Shape legend: N draft nodes, T = N + 1 fed tokens (c first), k depth, r experts, V vocabulary,
n internal nodes (nodes with candidates), m most candidates of a node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_lightning.decoding.sampling import Sampling, sample, warp_logprobs
from mtp_lightning.decoding.speculative import _columns
from mtp_lightning.decoding.tree import DraftTree


@dataclass(frozen=True)
class Shape:
    """A sampled tree's shape: node i (1-based, c being 0) is the ``ranks[i-1]``-th draw under
    ``parents[i-1]``, at ``depths[i-1]``, added by candidate source ``sources[i-1]``. Parents come
    before their children and a node's ranks 0, 1, .. in that order."""

    parents: tuple[int, ...]
    ranks: tuple[int, ...]
    depths: tuple[int, ...]
    sources: tuple[int, ...]


def sampled_shape(width: int, experts: int, depth: int, budget: int, rank: int) -> Shape:
    """The sampled tree's shape (module docstring): the main chain of first draws to ``depth``, then
    ``experts`` chains starting at the root's next draws, then ranks 1..width-1 under every node of the
    main chain (merged with what is in), admitted in that order while fewer than ``budget`` nodes are in.
    Sources: 0 the main chain, e its e-th extra chain, ``rank + 1`` a branch.

    >>> s = sampled_shape(width=2, experts=1, depth=2, budget=5, rank=2)
    >>> s.parents, s.ranks, s.depths, s.sources
    ((0, 1, 0, 3, 1), (0, 0, 1, 0, 1), (1, 2, 1, 2, 2), (0, 0, 1, 1, 3))
    """
    paths = [((0,) * d, 0) for d in range(1, depth + 1)]
    for e in range(1, experts + 1):
        paths += [((e,) + (0,) * d, e) for d in range(depth)]
    for s in range(depth):
        paths += [((0,) * s + (j,), rank + 1) for j in range(1, width)]
    index: dict[tuple[int, ...], int] = {(): 0}
    parents, ranks, depths, sources = [], [], [], []
    for path, source in paths:
        if path in index:
            continue
        if len(parents) >= budget:
            break
        index[path] = len(parents) + 1
        parents.append(index[path[:-1]])
        ranks.append(path[-1])
        depths.append(len(path))
        sources.append(source)
    return Shape(tuple(parents), tuple(ranks), tuple(depths), tuple(sources))


def draw_without_replacement(logq: torch.Tensor, m: int, generator: torch.Generator | None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """m ordered draws without replacement from each row of log-probs (n, V) -> tokens (n, m) and
    whether each exists (n, m) bool (False once a row's support is used up, and after).

    Gumbel-top-k: with E_x ~ Exp(1), the largest log q(x) - log E_x is a draw from q (the exponential
    race of ``sampling.sample``), and given it, the next largest is a draw from q without it, and so
    on: the order of the top m keys is a sequence of m draws without replacement."""
    e = torch.empty_like(logq).exponential_(generator=generator).clamp_min_(1e-30)
    keys, tokens = (logq - e.log()).topk(m, dim=-1)  # (n, m), descending
    return tokens, keys > float("-inf")


@dataclass
class SampledTree:
    """A drawn tree (``draw_tree``) and what its verification needs: the draft log-probs ``logq``
    (n, V) each internal node's candidates were drawn from, those candidates' fed indices in draw order
    (``kids``, one list per internal node), and each fed index's internal row (``row``, absent for a
    leaf)."""

    tree: DraftTree
    logq: torch.Tensor
    kids: list[list[int]]
    row: dict[int, int]


def draw_tree(shape: Shape, logpi: torch.Tensor, probs: torch.Tensor, sampling: Sampling,
              generator: torch.Generator | None, ids: torch.Tensor | None = None, vocab: int = 0) -> SampledTree:
    """Draw the tokens of ``shape`` (module docstring): the log expert posterior after c,
    logpi (r,), and the factor probabilities at offsets 2..k+1, probs (k, r, V'), k >= the shape's
    depth. Each level's draft conditionals q_v = warp(pi(v) @ P^(s)) are one product, and each
    level's candidates one ``draw_without_replacement``; the host sees the tokens once, at the end.
    ``ids`` (V',): the heads' columns' token ids for a draft vocabulary, whose q is then scattered into
    the full ``vocab`` (0 elsewhere)."""
    N = len(shape.parents)
    kids_of: list[list[int]] = [[] for _ in range(N + 1)]
    for i, (par, rk) in enumerate(zip(shape.parents, shape.ranks), start=1):
        assert rk == len(kids_of[par]), "ranks of a node come in order"
        kids_of[par].append(i)
    tiny = torch.finfo(probs.dtype).tiny
    device = probs.device
    post = (logpi - logpi.logsumexp(-1)).exp().to(probs.dtype)[None]  # (1, r): the posteriors of `level`
    level = [0]  # the nodes whose candidates are drawn next, all at one depth, with post's rows
    token = torch.zeros(N + 1, dtype=torch.long, device=device)  # heads' columns
    valid = torch.ones(N + 1, dtype=torch.bool, device=device)
    logqs, internal = [], []
    depth = 0
    while level:
        m = max(len(kids_of[v]) for v in level)
        logq = warp_logprobs((post @ probs[depth]).log(), sampling)  # (n_d, V')
        drawn, ok = draw_without_replacement(logq, min(m, logq.shape[-1]), generator)  # (n_d, <= m)
        if drawn.shape[1] < m:  # more ranks than tokens: the rest do not exist
            drawn = torch.cat([drawn, drawn.new_zeros(drawn.shape[0], m - drawn.shape[1])], 1)
            ok = torch.cat([ok, ok.new_zeros(ok.shape[0], m - ok.shape[1])], 1)
        logqs.append(logq)
        internal += level
        # every child of this level: its parent's row and rank, as index tensors made on the host
        pairs = [(r, j, ch) for r, v in enumerate(level) for j, ch in enumerate(kids_of[v])]
        rows_t, ranks_t, kids_t = (torch.tensor(x, device=device) for x in zip(*pairs))
        level_t = torch.tensor(level, device=device)
        token[kids_t] = drawn[rows_t, ranks_t]
        valid[kids_t] = ok[rows_t, ranks_t] & valid[level_t[rows_t]]
        nxt = [(r, ch) for r, j, ch in pairs if kids_of[ch]]
        if nxt:
            sel = torch.tensor([r for r, _ in nxt], device=device)
            chosen = token[torch.tensor([ch for _, ch in nxt], device=device)]  # (n_{d+1},)
            post = post[sel] * probs[depth, :, chosen].T.clamp_min(tiny)  # (n_{d+1}, r)
            post = post / post.sum(-1, keepdim=True)
        level = [ch for _, ch in nxt]
        depth += 1
    logq = torch.cat(logqs) if logqs else probs.new_zeros(0, vocab or probs.shape[-1])  # (n, V')
    if ids is not None:
        full = logq.new_full((logq.shape[0], vocab), float("-inf"))
        logq = full.scatter_(-1, ids.expand(logq.shape[0], -1), logq)  # (n, V)
        token = ids[token]
    host_tokens, host_valid = token.tolist(), valid.tolist()  # one sync
    # keep the nodes that exist, renumbered in order: missing ranks drop their subtrees
    tree, fed = DraftTree(), {0: 0}
    for i in range(1, N + 1):
        if host_valid[i]:
            par = fed[shape.parents[i - 1]]
            tree.tokens.append(host_tokens[i])
            tree.parents.append(par)
            tree.depths.append(shape.depths[i - 1])
            tree.sources.append(shape.sources[i - 1])
            fed[i] = len(tree.tokens)
            tree.children[(par, host_tokens[i])] = fed[i]
    row, kids = {}, []
    for r, v in enumerate(internal):
        kept = [fed[ch] for ch in kids_of[v] if ch in fed]
        if v in fed and kept:
            row[fed[v]] = r
        kids.append(kept)
    return SampledTree(tree, logq, kids, row)


def rejection_stages(logp: torch.Tensor, logq: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-candidate rejection without replacement at n nodes at once (module docstring): the warped
    verifier log-probs logp (n, V), the draft log-probs logq (n, V) the candidates were drawn from,
    the candidates (n, m) in draw order and how many each node has, counts (n,) (entries past a count
    are ignored). Returns the probability of accepting candidate j once j - 1 were rejected, (n, m) (0
    past a count), and the log residual after all of a node's candidates were rejected (n, V), which is
    p itself for a node without candidates."""
    p, q = logp.exp(), logq.exp()
    tiny = torch.finfo(p.dtype).tiny
    alphas = []
    for j in range(candidates.shape[1]):
        x = candidates[:, j:j + 1]  # (n, 1)
        has = (counts > j)[:, None]  # (n, 1)
        px, qx = p.gather(-1, x), q.gather(-1, x)
        alphas.append(torch.where(has, (px / qx.clamp_min(tiny)).clamp(max=1.0), 0.0))
        res = (p - q).clamp_min(0.0)
        total = res.sum(-1, keepdim=True)
        # total == 0 means p == q: stage j accepts surely, so the fallback is never sampled from
        p = torch.where(has & (total > 0), res / total.clamp_min(tiny), p)
        gone = q.scatter(-1, x, 0.0)
        q = torch.where(has, gone / gone.sum(-1, keepdim=True).clamp_min(tiny), q)
    alpha = torch.cat(alphas, -1) if alphas else p.new_zeros(p.shape[0], 0)
    return alpha, p.log()


def walk(st: SampledTree, logp: torch.Tensor, generator: torch.Generator | None) -> tuple[list[int], int]:
    """Verify a drawn tree from the root: the warped verifier log-probs at every fed token (T, V) ->
    the accepted nodes (fed indices, root to leaf) and the step's final token (a bonus draw from p at
    an accepted node without candidates, else the residual after its candidates were all rejected).
    One host sync per visited node."""
    path, node = [], 0
    device = logp.device
    while True:
        r = st.row.get(node)
        if r is None:  # no candidates here: the bonus token from p
            return path, int(sample(logp[node], generator))
        kids = st.kids[r]
        cand = torch.tensor([[st.tree.tokens[i - 1] for i in kids]], device=device)  # (1, w)
        alpha, residual = rejection_stages(logp[node:node + 1], st.logq[r:r + 1], cand,
                                           torch.tensor([len(kids)], device=device))
        u = torch.rand(len(kids), generator=generator, device=device)
        accepted = (u < alpha[0]).tolist()
        if True not in accepted:
            return path, int(sample(residual[0], generator))
        node = kids[accepted.index(True)]
        path.append(node)


def posterior(model, zt: torch.Tensor, st: list[torch.Tensor], lf1: torch.Tensor | None, c: int, k: int,
               int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``tree._factors`` for sampling: the log expert posterior after c, log w_a + log P_a^(1)(c) (r,)
    (unnormalised), and the factor probabilities at offsets 2..k+1 (k, r, V'). ``lf1``: the
    verifier's offset-1 log factors (1, r, V) (``marginal``), or None (``lm_head``): computed here.
    A c outside a draft vocabulary leaves the router's weights (``speculative.draft``)."""
    if lf1 is None:
        f = model.factor_logprobs(st, range(k + 1), int8=int8)[0]  # (k+1, r, V')
        lf1, f = f[:1], f[1:]
    else:
        f = model.factor_logprobs(st, range(1, k + 1), int8=int8)[0]  # (k, r, V')
    col, inside = _columns(model, torch.tensor([c], device=f.device))
    first = lf1[0, :, col[0]]  # (r,)
    if inside is not None and not bool(inside[0]):
        first = torch.zeros_like(first)
    return model.router_logw(zt)[0] + first, f.exp()
