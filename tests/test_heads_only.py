"""Heads-only training on a frozen backbone: the hidden-state cache (``data/hidden_cache.py``) and the
distillation's products shared with the CP objective (``distill_objective``'s factors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtp_lightning.config import LossConfig, load_config
from mtp_lightning.data.hidden_cache import HiddenStates, ensure_states, run_window_ids
from mtp_lightning.data.sampler import ResumableBatchSampler
from mtp_lightning.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- which windows a run needs --------------------------------------------------------------------


def test_run_window_ids_are_every_window_any_rank_draws():
    n_items, B, seed, world, steps = 50, 4, 3, 2, 5
    got = run_window_ids(n_items, B, seed, steps * world)
    drawn = set()
    for rank in range(world):
        sampler = ResumableBatchSampler(n_items, B, seed, rank=rank, world_size=world, length=steps)
        drawn |= {i for batch in sampler for i in batch}
    assert got.tolist() == sorted(drawn) and len(got) == len(drawn) <= steps * world * B
    # a resumed rank starts inside the same stream: its windows are among them
    resumed = ResumableBatchSampler(n_items, B, seed, rank=1, world_size=world, start_sample=3 * B * world,
                                    length=steps, skip=3)
    assert {i for batch in resumed for i in batch} <= drawn
    assert run_window_ids(n_items, B, seed, 13).tolist() == list(range(n_items))  # 13 x 4 > 50: all
    assert run_window_ids(n_items, B, seed, 0).tolist() == list(range(n_items))  # no step limit


# ---- the cache entry ------------------------------------------------------------------------------


class Encoder:
    """A stand-in trunk: z[k, t, :] = token * (1, 2, ..., D), counting the windows it sees."""

    def __init__(self, D: int = 3):
        self.D, self.seen = D, []

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        self.seen += inputs[:, 0].tolist()
        return inputs.float()[..., None] * torch.arange(1, self.D + 1, dtype=torch.float32)  # (k, T, D)


def windows(ids: np.ndarray) -> torch.Tensor:
    """Window i's inputs: T = 2 tokens (100 + i, 200 + i)."""
    ids = torch.as_tensor(ids)
    return torch.stack([100 + ids, 200 + ids], dim=1)  # (k, 2)


def test_entry_is_built_extended_and_rebuilt(tmp_path, capsys):
    folder, enc, lines = tmp_path / "entry", Encoder(), []
    entry = ensure_states(folder, np.array([1, 3, 5]), windows, enc, batch_size=2, report=lines.append)
    assert sorted(enc.seen) == [101, 103, 105]
    assert torch.equal(entry.gather([5, 1]), enc(windows(np.array([5, 1]))))
    assert entry.gather([1, 2]) is None  # window 2 is not cached: the caller runs the trunk
    assert "3 windows" in lines[-1]
    # a run that needs more windows encodes only the missing ones, and keeps the rest
    enc.seen.clear()
    entry = ensure_states(folder, np.array([1, 2, 3, 7]), windows, enc, batch_size=2)
    assert sorted(enc.seen) == [102, 107]
    assert entry.ids.tolist() == [1, 2, 3, 5, 7]
    assert torch.equal(entry.gather([7, 5, 3, 2, 1]), enc(windows(np.array([7, 5, 3, 2, 1]))))
    # covered: nothing is encoded
    enc.seen.clear()
    ensure_states(folder, np.array([2, 5]), windows, enc, batch_size=2)
    assert enc.seen == []
    # a truncated states file is noticed by its manifest and rebuilt from scratch
    states = folder / "states.npy"
    states.write_bytes(states.read_bytes()[:-8])
    entry = ensure_states(folder, np.array([2, 5]), windows, enc, batch_size=2)
    assert "is damaged" in capsys.readouterr().err
    assert entry.ids.tolist() == [2, 5] and torch.equal(entry.gather([2, 5]), enc(windows(np.array([2, 5]))))
    assert not list(folder.glob(".*.tmp"))  # no temporaries left behind


def test_entry_survives_a_failed_extension(tmp_path):
    folder, enc = tmp_path / "entry", Encoder()
    ensure_states(folder, np.array([0, 1]), windows, enc, batch_size=1)

    def broken(inputs):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ensure_states(folder, np.array([0, 1, 2]), windows, broken, batch_size=1)
    assert not list(folder.glob(".*.tmp"))
    # the old files are intact; the entry is rebuilt on the next call
    assert torch.equal(HiddenStates(folder).gather([0, 1]) if (folder / "states.manifest").exists()
                       else torch.from_numpy(np.load(folder / "states.npy")), enc(windows(np.array([0, 1]))))
    enc.seen.clear()
    entry = ensure_states(folder, np.array([0, 1, 2]), windows, enc, batch_size=1)
    assert entry.ids.tolist() == [0, 1, 2]
    assert torch.equal(entry.gather([0, 1, 2]), enc(windows(np.array([0, 1, 2]))))


# ---- one set of products for the CP objective and the distillation ----------------------------------


@pytest.mark.parametrize("draft_vocab", [0, 40])
def test_distillation_factors_are_the_cp_objectives(hf_model, base_folder, draft_vocab):
    """cp_objective fed the distillation's factors gives the same loss and gradients as computing its
    own: the shared products change the cost, not the objective."""
    import functools

    from mtp_lightning.objectives.cp_loss import cp_objective
    from mtp_lightning.objectives.distill import distill_objective

    torch.manual_seed(0)
    model = hf_model(base_folder, n_future=3, rank=2)
    if draft_vocab:
        from mtp_lightning.config import BackboneConfig, HeadsConfig, ModelConfig
        from mtp_lightning.model.cp_model import CPModel

        model = CPModel(ModelConfig(backbone=BackboneConfig(kind="hf", name_or_path=str(base_folder)),
                                    heads=HeadsConfig(n_future=3, rank=2, draft_vocab=draft_vocab)))
    window = torch.randint(0, model.unembedding.shape[0], (2, 12 + 3))
    inputs = window[:, :12]
    targets = window[:, 1:].unfold(1, 3, 1)  # (B, T, n)
    cfg = LossConfig(chunk_size=8)  # several chunks per offset
    classes = model.head_targets(targets)

    def losses(shared: bool):
        model.zero_grad()
        z, states = model(inputs)
        U = model.head_unembedding(other=True)
        base = model.lm_logits if not draft_vocab else functools.partial(model.lm_logits, rows=model.heads.draft_ids)
        d = distill_objective(model.heads, z, states, U, z.detach(), base, classes, cfg, kl_cols=draft_vocab,
                              frozen_rows=model.head_frozen_rows)
        terms = cp_objective(model.heads, z, states, U, classes, cfg, lm_U=model.unembedding, lm_targets=targets,
                             frozen_rows=model.head_frozen_rows, factors=d.factors if shared else None)
        (terms.loss + d.loss).backward()
        grads = {k: p.grad.clone() for k, p in model.heads.named_parameters() if p.grad is not None}
        return terms, d, grads

    own, d_own, g_own = losses(False)
    shared, d_shared, g_shared = losses(True)
    assert torch.allclose(shared.joint_nll, own.joint_nll, atol=1e-5)
    assert torch.allclose(shared.offset_nll, own.offset_nll, atol=1e-5)
    assert torch.allclose(d_shared.kl, d_own.kl, atol=0) and torch.allclose(d_shared.ce, d_own.ce, atol=0)
    assert set(g_shared) == set(g_own) and len(g_own) >= 3
    for k in g_own:
        assert torch.allclose(g_shared[k], g_own[k], atol=1e-5, rtol=1e-4), k
    # the distillation's CE at offset s is the CP marginal's NLL over the positions it covers
    assert torch.allclose(d_own.ce[0], own.offset_nll[0], atol=1e-5)


# ---- a fit with the cache -------------------------------------------------------------------------


def test_cached_fit_trains_exactly_as_the_uncached(fit_args, tiny_hf, tb_scalars, tmp_path, capsys):
    from mtp_lightning.cli import main

    folder = tiny_hf(tmp_path / "llama", "llama")
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert main(fit_args(folder, tmp_path, "plain", cache)) == 0
    capsys.readouterr()
    assert main(fit_args(folder, tmp_path, "cached", cache, "model.backbone.cache_states=true")) == 0
    out = capsys.readouterr().out
    assert "windows through the frozen backbone" in out and "hidden-state cache:" in out
    plain, cached = tb_scalars(tmp_path / "plain"), tb_scalars(tmp_path / "cached")
    for tag in ("train/loss", "train/distill_kl", "val/loss", "val/bits_per_byte"):
        assert plain[tag] == cached[tag], tag  # bit for bit: the same states, the same arithmetic
    entries = sorted((tmp_path / "cache").glob("hidden-*"))
    assert len(entries) == 2  # train and val
    counts = sorted(len(np.load(e / "ids.npy")) for e in entries)
    assert 1 <= counts[0] <= 4  # one validation batch (limit_val_batches=1, batch_size=4), if the split has 4
    assert 4 < counts[1] <= 6 * 4  # the 6 steps' windows
    # a second run on the same data reads the cache: nothing goes through the backbone
    assert main(fit_args(folder, tmp_path, "again", cache, "model.backbone.cache_states=true")) == 0
    assert "windows through the frozen backbone" not in capsys.readouterr().out
    assert tb_scalars(tmp_path / "again")["train/loss"] == cached["train/loss"]


def test_cache_states_needs_a_frozen_pretrained_backbone():
    with pytest.raises(UserError, match="cache_states=true caches a frozen backbone's hidden states; it needs "
                                        "model.backbone.kind=hf and train_mode=heads_only"):
        load_config(overrides=["model.backbone.cache_states=true"])


@pytest.mark.parametrize("kl_cols,frozen", [(0, False), (6, True), (6, False)])
def test_distillation_gradient_by_hand_equals_autograd(kl_cols, frozen):
    """distill_objective's hand-derived chunk gradient against autograd through the definition:
    KL(p || q restricted and renormalised), CE = -log q(y), the factors log P_a(y); several chunks."""
    from mtp_lightning.config import GPTConfig, HeadsConfig
    from mtp_lightning.model.heads import CPHeads
    from mtp_lightning.objectives.distill import distill_objective, offset_weights

    torch.manual_seed(1)
    B, T, n, r, D, V = 2, 5, 3, 2, 8, 10
    heads = CPHeads(HeadsConfig(n_future=n, rank=r, kind="mlp"), GPTConfig(d_model=D)).double().float()
    V1 = kl_cols + 1 if kl_cols else V
    U = torch.randn(V1, D, requires_grad=not frozen or bool(kl_cols))
    frozen_rows = kl_cols if frozen else 0
    z = torch.randn(B, T, D, requires_grad=True)
    base_W = torch.randn(kl_cols or V, D)
    y = torch.randint(0, V1, (B, T, n))
    cfg = LossConfig(chunk_size=6, distill_beta=0.7, distill_gamma=0.5)

    def ours():
        return distill_objective(heads, z, [z] * n, U, z, lambda x: x @ base_W.T, y, cfg, kl_cols=kl_cols,
                                 frozen_rows=frozen_rows)

    def reference():
        Ur = torch.cat([U[:kl_cols].detach(), U[kl_cols:]]) if frozen else U
        logp_all = (z.detach() @ base_W.T).log_softmax(-1)  # (B, T, K)
        logw = heads.router_logits(z).log_softmax(-1)  # (B, T, r)
        kls, ces, facs = [], [], []
        for s in range(n):
            lp = (heads.expert_vectors(z, s) @ Ur.T).log_softmax(-1)  # (B, T, r, V1)
            logq = torch.logsumexp(logw[..., None] + lp, dim=-2)  # (B, T, V1)
            logq_kl = logq[..., :kl_cols].log_softmax(-1) if kl_cols else logq
            M = T - s
            p = logp_all[:, s:]
            kls.append((p.exp() * (p - logq_kl[:, :M])).sum(-1).mean())
            ces.append(-logq[:, :M].gather(-1, y[:, :M, s, None]).mean())
            facs.append(lp.gather(-1, y[:, :, s, None, None].expand(B, T, r, 1))[..., 0].reshape(B * T, r))
        kl, ce = torch.stack(kls), torch.stack(ces)
        g = offset_weights(n, cfg.distill_gamma)
        return (g * (0.7 * kl + 0.3 * ce)).sum(), kl, ce, torch.stack(facs, 1)

    weights = torch.randn(B * T, n, r)  # a downstream use of the factors, as the CP objective makes

    def grads(loss):
        params = [z, *heads.parameters()] + ([U] if U.requires_grad else [])
        return torch.autograd.grad(loss, params, allow_unused=True)

    mine = ours()
    want_loss, want_kl, want_ce, want_f = reference()
    assert torch.allclose(mine.kl, want_kl, atol=1e-5) and torch.allclose(mine.ce, want_ce, atol=1e-5)
    assert torch.allclose(mine.factors, want_f, atol=1e-5)
    got = grads(mine.loss + (weights * mine.factors).sum())
    want = grads(want_loss + (weights * want_f).sum())
    for a, b in zip(got, want):
        if b is None:
            assert a is None or not a.abs().sum()
        else:
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    if frozen:  # the frozen rows get exactly zero gradient
        assert not got[-1][:kl_cols].abs().sum() and got[-1][kl_cols:].abs().sum() > 0
