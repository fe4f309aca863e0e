"""The CP objective against brute force on a tiny vocabulary, and the lean loss against the naive one."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mtp_lightning.config import LossConfig
from mtp_lightning.objectives.cp_loss import balance_loss, cp_objective, mixture_health, target_logprob


def brute_force_joint(model, z, states, V, n):
    """P(y_1..y_n) for every y in V^n, by products of probabilities summed over experts (no logs)."""
    w = torch.softmax(model.heads.router_logits(z), -1)  # (r,)
    probs = [torch.softmax(model.heads.expert_vectors(states[s], s) @ model.unembedding.T, -1) for s in range(n)]
    table = {}
    for ys in itertools.product(range(V), repeat=n):
        total = 0.0
        for a in range(w.shape[0]):
            p = w[a].item()
            for s, y in enumerate(ys):
                p *= probs[s][a, y].item()
            total += p
        table[ys] = total
    return table


@pytest.mark.parametrize("kind", ["linear", "mlp", "block"])
def test_joint_nll_matches_brute_force(loss_model, kind):
    n, r, V = 3, 2, 4
    model, cfg = loss_model(n, r, V, kind=kind)
    idx = torch.tensor([[1, 3, 0, 2, 2, 1]])
    z, states = model(idx)
    T = idx.shape[1]
    targets = torch.randint(0, V, (1, T, n), generator=torch.Generator().manual_seed(1))
    terms = cp_objective(model.heads, z, states, model.unembedding, targets, cfg.model.loss)
    expected_nll, expected_offsets = 0.0, torch.zeros(n, dtype=torch.float64)
    for t in range(T):
        table = brute_force_joint(model, z[0, t], [u[0, t] for u in states], V, n)
        assert math.isclose(sum(table.values()), 1.0, rel_tol=1e-5)
        y = tuple(targets[0, t].tolist())
        expected_nll -= math.log(table[y])
        for s in range(n):  # marginal of offset s: sum the joint over the other offsets
            expected_offsets[s] -= math.log(sum(p for ys, p in table.items() if ys[s] == y[s]))
    assert terms.joint_nll.item() == pytest.approx(expected_nll / T, rel=1e-5)
    torch.testing.assert_close(terms.offset_nll.double(), expected_offsets / T, rtol=1e-5, atol=1e-6)


def test_rank_one_is_sum_of_independent_cross_entropies(loss_model):
    n, V = 4, 7
    model, cfg = loss_model(n=n, r=1, V=V)
    idx = torch.randint(0, V, (2, 5))
    z, states = model(idx)
    targets = torch.randint(0, V, (2, 5, n))
    cfg.model.loss.balance = "switch"  # must contribute nothing at r = 1
    terms = cp_objective(model.heads, z, states, model.unembedding, targets, cfg.model.loss)
    ce = sum(F.cross_entropy((model.heads.expert_vectors(states[s], s)[..., 0, :] @ model.unembedding.T)
                             .reshape(-1, V), targets[..., s].reshape(-1)) for s in range(n))
    assert terms.joint_nll.item() == pytest.approx(ce.item(), rel=1e-6)
    assert terms.balance.item() == 0.0
    assert terms.loss.item() == pytest.approx(ce.item(), rel=1e-6)


def test_marginal_is_a_distribution(loss_model):
    model, _ = loss_model(n=3, r=4, V=6)
    z, states = model(torch.randint(0, 6, (2, 5)))
    for verifier in ("marginal", "lm_head"):
        lp = model.verifier_logprobs(z, states, verifier)  # (2, 5, V)
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 5))


@pytest.mark.parametrize("balance", ["switch", "cv2", "none"])
def test_lean_loss_equals_naive_in_value_and_gradients(loss_model, balance):
    n, r, V = 3, 3, 50
    model, cfg = loss_model(n=n, r=r, V=V, D=16)
    idx = torch.randint(0, V, (3, 9))
    targets = torch.randint(0, V, (3, 9, n))
    results = []
    for lean in (False, True):
        loss_cfg = LossConfig(balance=balance, balance_weight=0.1, next_token_weight=0.5, lm_head_weight=0.3,
                              lean=lean, chunk_size=7,  # a chunk that does not divide the rows
                              position_fraction=1.0)
        model.zero_grad()
        z, states = model(idx)
        terms = cp_objective(model.heads, z, states, model.unembedding, targets, loss_cfg)
        terms.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((terms.loss.detach(), terms.balance.detach(), grads))
    (l0, b0, g0), (l1, b1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b1, b0)
    assert g0.keys() == g1.keys() and len(g0) > 5
    for k in g0:
        assert torch.isfinite(g1[k]).all(), k
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=k)


def test_target_logprob_bf16_close_to_fp32():
    torch.manual_seed(0)
    h, U = torch.randn(40, 16), torch.randn(30, 16)
    tgt = torch.randint(0, 30, (40,))
    exact = target_logprob(h, U, tgt, chunk=16)
    approx = target_logprob(h, U, tgt, chunk=16, bf16=True)
    assert exact.dtype == approx.dtype == torch.float32
    torch.testing.assert_close(approx, exact, rtol=0.05, atol=0.1)
    torch.testing.assert_close(exact, (h @ U.T).log_softmax(-1).gather(1, tgt[:, None])[:, 0])


def test_balance_losses_exact_values():
    w = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    log_w = w.log()
    # switch: f = wins (2, 1, 1)/4, P = column means; loss = r * sum f * P
    P = w.mean(0)
    f = torch.tensor([0.5, 0.25, 0.25])
    sw = balance_loss(log_w, w, LossConfig(balance="switch"))
    assert sw.item() == pytest.approx(3 * (f * P).sum().item(), rel=1e-6)
    # posterior assignment uses the posterior's argmax instead
    post = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1.0]])
    sw_post = balance_loss(log_w, post, LossConfig(balance="switch", switch_assign="posterior"))
    assert sw_post.item() == pytest.approx(3 * (torch.tensor([0, 0.75, 0.25]) * P).sum().item(), rel=1e-6)
    imp = w.sum(0)
    cv2 = balance_loss(log_w, w, LossConfig(balance="cv2"))
    assert cv2.item() == pytest.approx((imp.var(unbiased=False) / imp.mean() ** 2).item(), rel=1e-6)
    assert balance_loss(log_w, w, LossConfig(balance="none")).item() == 0.0
    # a perfectly balanced router scores the minimum of switch (1.0) and zero cv2
    uniform = torch.full((6, 3), 1 / 3).log()
    assert balance_loss(uniform, uniform.exp(), LossConfig(balance="cv2")).item() == pytest.approx(0.0, abs=1e-7)


def test_mixture_health_counts_dead_experts():
    w = torch.tensor([[0.98, 0.01, 0.01], [0.97, 0.02, 0.01]])
    h = mixture_health(w.log(), w)
    assert h["dead_experts"].item() == 2.0
    assert h["busiest_share"].item() == 1.0
    torch.testing.assert_close(h["expert_wins"], torch.tensor([1.0, 0.0, 0.0]))
    assert h["router_entropy"].item() == pytest.approx(-(w * w.log()).sum(-1).mean().item(), rel=1e-6)


def test_position_subset_keeps_next_token_term_on_all_positions(loss_model):
    n, r, V = 3, 2, 11
    model, cfg = loss_model(n=n, r=r, V=V)
    idx = torch.randint(0, V, (2, 8))
    targets = torch.randint(0, V, (2, 8, n))
    z, states = model(idx)
    full = cp_objective(model.heads, z, states, model.unembedding, targets, LossConfig(position_fraction=1.0))
    sub = cp_objective(model.heads, z, states, model.unembedding, targets, LossConfig(position_fraction=0.25),
                       generator=torch.Generator().manual_seed(0))
    assert sub.token_nll.shape == (16,) and sub.log_w.shape == (4, r)
    torch.testing.assert_close(sub.offset_nll[0], full.offset_nll[0])  # next-token NLL on every position
    torch.testing.assert_close(sub.token_nll, full.token_nll)
