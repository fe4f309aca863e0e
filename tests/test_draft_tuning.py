"""Draft tuning: its objective against brute force, its batches, and a fit that runs it.

The property that matters: after ``trainer.max_steps`` only the maps of offsets 2..n change, so the
verifier and therefore every decoded output stay bit-identical, while the drafts (trained on the
model's own greedy text) are accepted more often. And a run resumed inside draft tuning ends exactly
where an uninterrupted one does.
"""

import itertools
import math
from pathlib import Path

import pytest
import torch

from mtp_lightning.checkpoints.io import load_for_inference, safe_load
from mtp_lightning.cli import main
from mtp_lightning.decoding.autoregressive import generate_ar
from mtp_lightning.decoding.metrics import SpecAcceptance
from mtp_lightning.decoding.sampling import Sampling
from mtp_lightning.decoding.speculative import generate_speculative
from mtp_lightning.objectives.draft_tuning import (draft_objective, generate_pool, mixed_pool, pool_batch,
                                                   soft_terms, verifier_targets)

CONF = str(Path(__file__).resolve().parent.parent / "conf" / "smoke.yaml")
DRAFT = ["draft_tuning.sequences=24", "draft_tuning.prompt_len=16", "draft_tuning.new_tokens=24",
         "draft_tuning.batch_size=8", "draft_tuning.lr=3e-3"]
FAST = ["trainer.progress_bar=false", "trainer.max_steps=20", "trainer.val_check_interval=10",
        "checkpoint.every_n_steps=10", "trainer.log_every_n_steps=2", "spec.every_n_val=0", *DRAFT]


@pytest.mark.parametrize("kind", ["mlp", "block"])
def test_draft_objective_matches_brute_force_and_trains_only_the_draft_maps(loss_model, kind):
    n, r, V = 3, 2, 4
    model, cfg = loss_model(n, r, V, kind=kind)
    idx = torch.tensor([[1, 3, 0, 2, 2, 1]])
    with torch.no_grad():  # as in the training step: the trunk is frozen
        z = model.trunk(idx)
    states = model.heads.offset_states(z)
    targets = torch.randint(0, V, (1, 6, n), generator=torch.Generator().manual_seed(3))
    first = 2
    loss = draft_objective(model.heads, z, states, model.unembedding, targets, first, cfg.model.loss)
    expected = 0.0
    for t in range(first, 6):  # -log P(y_2..y_n | y_1) = -log [P(y_1..y_n) / sum_y' P(y_1, y')]
        w = torch.softmax(model.heads.router_logits(z[0, t]), -1)
        probs = [torch.softmax(model.heads.expert_vectors(states[s][0, t], s) @ model.unembedding.T, -1)
                 for s in range(n)]

        def joint(ys):
            return sum(w[a].item() * math.prod(probs[s][a, y].item() for s, y in enumerate(ys)) for a in range(r))

        y = targets[0, t].tolist()
        first_marginal = sum(joint([y[0], *rest]) for rest in itertools.product(range(V), repeat=n - 1))
        expected -= math.log(joint(y) / first_marginal)
    assert loss.item() == pytest.approx(expected / (6 - first), rel=1e-5)
    model.zero_grad(set_to_none=True)
    loss.backward()
    trained = {id(p) for p in model.heads.draft_parameters()}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # the router, offset 1 and the trunk: untouched, not even zero gradients
            assert p.grad is None, name


def _soft_brute_force(model, z, states, targets, first, verifier_lp, beta, kl_cols):
    """The soft-target objective written out position by position with plain autograd ops: the
    posterior chain's q_s built expert by expert, p_s the verifier's log-probs at t + s - 1."""
    heads, U = model.heads, model.unembedding
    B, T, n = targets.shape
    ce, kl = torch.zeros(n - 1), torch.zeros(n - 1)
    counts = torch.zeros(n - 1)
    for b in range(B):
        for t in range(first, T):
            w = torch.softmax(heads.router_logits(z[b, t]), -1)  # (r,)
            logP = [torch.log_softmax(heads.expert_vectors(states[s][b, t], s) @ U.detach().T, -1)
                    for s in range(n)]  # n x (r, V)
            log_post = w.log() + logP[0][:, targets[b, t, 0]].detach()
            for s in range(1, n):
                pi = torch.softmax(log_post, -1)
                q = (pi[:, None] * logP[s].exp()).sum(0)  # (V,)
                ce[s - 1] = ce[s - 1] - q[targets[b, t, s]].log()
                if t + s < T:
                    p = verifier_lp[b, t + s].exp()
                    qk = q[:kl_cols] / q[:kl_cols].sum() if kl_cols else q
                    kl[s - 1] = kl[s - 1] + (p * (p.log() - qk.log())).sum()
                    counts[s - 1] += 1
                log_post = log_post + logP[s][:, targets[b, t, s]]
    ce, kl = ce / (B * (T - first)), kl / counts
    return (1 - beta) * ce.sum() + beta * kl.sum(), ce, kl


@pytest.mark.parametrize("kind,kl_cols", [("mlp", 0), ("block", 0), ("mlp", 3)])
def test_soft_targets_match_brute_force_in_value_and_gradient(loss_model, kind, kl_cols):
    """Values and the hand-derived gradients of the soft-target objective against autograd through the
    written-out mixture; ``kl_cols`` = 3 is a draft vocabulary's KL over the first 3 classes of 4."""
    n, r, V, T, first, beta = 3, 2, 4, 6, 2, 0.7
    model, cfg = loss_model(n, r, V, kind=kind)
    idx = torch.tensor([[1, 3, 0, 2, 2, 1], [0, 0, 3, 1, 2, 3]])
    with torch.no_grad():
        z = model.trunk(idx)
    states = model.heads.offset_states(z)
    targets = torch.randint(0, V, (2, T, n), generator=torch.Generator().manual_seed(3))
    verifier_lp = torch.randn(2, T, kl_cols or V, generator=torch.Generator().manual_seed(4)).log_softmax(-1)
    drafts = list(model.heads.draft_parameters())

    terms = soft_terms(model.heads, z, states, model.unembedding, targets, first, cfg.model.loss, verifier_lp,
                       beta, kl_cols=kl_cols)
    got = torch.autograd.grad(terms.loss, drafts)
    states = model.heads.offset_states(z)  # a fresh graph: a block head's states carry parameters
    loss, ce, kl = _soft_brute_force(model, z, states, targets, first, verifier_lp, beta, kl_cols)
    want = torch.autograd.grad(loss, drafts)
    torch.testing.assert_close(terms.ce, ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.kl, kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.loss, loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # the hard part is the hard objective: the chain rule over the posterior chain
    hard = draft_objective(model.heads, z, model.heads.offset_states(z), model.unembedding, targets, first,
                           cfg.model.loss)
    assert terms.ce.sum().item() == pytest.approx(hard.item(), rel=1e-5)
    # and only the draft maps learn
    model.zero_grad(set_to_none=True)
    states = model.heads.offset_states(z)
    soft_terms(model.heads, z, states, model.unembedding, targets, first, cfg.model.loss, verifier_lp,
               beta, kl_cols=kl_cols).loss.backward()
    trained = {id(p) for p in drafts}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in trained), name


def test_verifier_targets_are_the_decoders_verifier(loss_model):
    model, _ = loss_model(n=3, r=2, V=6)
    idx = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2], [3, 3, 1, 0]])
    with torch.no_grad():
        z = model.trunk(idx)
        states = model.heads.offset_states(z)
        for verifier in ("marginal", "lm_head"):
            got = verifier_targets(model, z, states, verifier, rows=2)  # in two pieces
            torch.testing.assert_close(got, model.verifier_logprobs(z, states, verifier).float())


def _sampled_acceptance(model, pool: torch.Tensor, first: int) -> float:
    """The probability that the first sampled draft is kept, sum_x min(p, q_2), averaged over the pool's
    positions from ``first`` on: q_2 the posterior chain's draft after the continuation's own next token,
    p the verifier one position later. Exact (no draws)."""
    from mtp_lightning.data.packing import split_window

    inputs, targets = split_window(pool, model.n_future)
    with torch.no_grad():
        z = model.trunk(inputs)
        states = model.heads.offset_states(z)
        p = model.verifier_logprobs(z, states, "marginal").exp()[:, first + 1:]  # (B, T', V)
        w = model.heads.router_logits(z).softmax(-1)[:, first:-1]  # (B, T', r)
        P = [model.factor_logprobs(states, range(s, s + 1))[..., 0, :, :].exp()[:, first:-1] for s in (0, 1)]
        y1 = targets[:, first:-1, 0]  # (B, T')
        post = w * P[0].gather(-1, y1[..., None, None].expand(*y1.shape, w.shape[-1], 1))[..., 0]
        q = (post[..., None] * P[1]).sum(-2) / post.sum(-1, keepdim=True)  # (B, T', V)
    return float(torch.minimum(p, q).sum(-1).mean())


def test_soft_targets_keep_sampled_drafts_that_hard_targets_on_greedy_text_lose(decoding_model):
    """Tuned on greedy continuations, hard targets make the drafts sharp and lower sampled acceptance;
    soft targets (the verifier's distributions) raise it. Measured exactly on sampled continuations
    of other prompts, so neither objective saw them."""
    from mtp_lightning.config import LossConfig
    from mtp_lightning.data.packing import split_window

    base = decoding_model("mlp", rank=2, vocab=50, n_future=4, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts, held = torch.randint(0, 50, (32, 6), generator=g), torch.randint(0, 50, (16, 6), generator=g)
    pool = generate_pool(base, prompts, 18, "marginal")
    test = generate_pool(base, held, 18, "marginal", sampling=Sampling(temperature=1.0),
                         generator=torch.Generator().manual_seed(1))
    before = _sampled_acceptance(base, test, 5)
    after = {}
    for beta in (0.0, 1.0):
        model = decoding_model("mlp", rank=2, vocab=50, n_future=4, seed=0)
        opt = torch.optim.Adam(model.heads.draft_parameters(), lr=1e-2)
        for step in range(60):
            inputs, targets = split_window(pool_batch(pool, step, 0, 16), 4)
            with torch.no_grad():
                z = model.trunk(inputs)
            states = model.heads.offset_states(z)
            lp = verifier_targets(model, z, states, "marginal")
            loss = soft_terms(model.heads, z, states, model.unembedding, targets, 5, LossConfig(), lp, beta).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        after[beta] = _sampled_acceptance(model, test, 5)
    assert after[0.0] < before < after[1.0], (before, after)


def test_pool_batch_depends_on_the_step_only_and_splits_ranks():
    pool = torch.arange(40).view(20, 2)
    a = pool_batch(pool, step=7, seed=1, batch_size=4)
    assert torch.equal(a, pool_batch(pool, step=7, seed=1, batch_size=4))
    assert not torch.equal(a, pool_batch(pool, step=8, seed=1, batch_size=4))
    ranks = [pool_batch(pool, step=7, seed=1, batch_size=4, rank=k, world=2) for k in range(2)]
    assert torch.equal(torch.cat(ranks), pool_batch(pool, step=7, seed=1, batch_size=8))  # one global batch
    assert len({int(x) for x in torch.cat(ranks)[:, 0]}) == 8  # disjoint rows


def _acceptance(model, prompts: torch.Tensor, new_tokens: int) -> float:
    metric = SpecAcceptance(model.n_future - 1)
    metric.update(*generate_speculative(model, prompts, new_tokens).step_counts())
    return float(metric.summary()["mean_acceptance_length"])


def test_tuned_drafts_are_accepted_more_often(decoding_model):
    """A random model (not degenerate: its greedy text does not repeat one token) whose drafts are
    tuned on its own continuations: the same verifier, more accepted drafts per step."""
    from mtp_lightning.config import LossConfig
    from mtp_lightning.data.packing import split_window

    model = decoding_model("mlp", rank=2, vocab=50, n_future=4, seed=0)
    prompts = torch.randint(0, 50, (32, 6), generator=torch.Generator().manual_seed(0))
    pool = generate_pool(model, prompts, 18, "marginal")
    before_tokens = generate_ar(model, prompts, 18).tokens
    before = _acceptance(model, prompts, 18)
    opt = torch.optim.Adam(model.heads.draft_parameters(), lr=1e-2)
    for step in range(60):
        inputs, targets = split_window(pool_batch(pool, step, 0, 16), 4)
        with torch.no_grad():
            z = model.trunk(inputs)
        loss = draft_objective(model.heads, z, model.heads.offset_states(z), model.unembedding, targets, 5,
                               LossConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert generate_ar(model, prompts, 18).tokens == before_tokens
    assert generate_speculative(model, prompts, 18).tokens == before_tokens
    after = _acceptance(model, prompts, 18)
    assert before < 1.8 and after > before + 0.6, (before, after)


@pytest.fixture(scope="module")
def draft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["fit", "--config", CONF, f"run.root={root}", "run.name=dt", *FAST, "draft_tuning.steps=12"]) == 0
    return root / "dt"


def test_draft_tuning_changes_only_the_draft_maps_and_no_output(draft_run):
    before = safe_load(draft_run / "checkpoints" / "best-step0000020.ckpt")  # the last step before it
    after = safe_load(draft_run / "checkpoints" / "last.ckpt")
    assert before["global_step"] == 20 and after["global_step"] == 32
    changed = sorted(k for k, v in before["state_dict"].items() if not torch.equal(v, after["state_dict"][k]))
    assert changed == ["model.heads.draft_weight"]
    old, _, _ = load_for_inference(draft_run / "checkpoints" / "best-step0000020.ckpt")
    new, _, cfg = load_for_inference(draft_run / "checkpoints" / "last.ckpt")
    from mtp_lightning.data import build_datamodule
    from mtp_lightning.data.tokenizer import Tokenizer

    dm = build_datamodule(cfg.data, cfg.tokenizer, new.n_future, cfg.run.seed)
    dm.set_tokenizer(Tokenizer.from_json((draft_run / "tokenizer.json").read_text()))
    for p in dm.val_prompts(4, 16).tolist():
        assert generate_ar(old, [p], 24).tokens == generate_ar(new, [p], 24).tokens
        assert generate_speculative(new, [p], 24).tokens == generate_ar(new, [p], 24).tokens


def test_resume_inside_draft_tuning_matches_the_uninterrupted_run(draft_run, tmp_path):
    args = ["fit", "--config", CONF, f"run.root={tmp_path}", "run.name=dt", *FAST]
    assert main([*args, "draft_tuning.steps=5"]) == 0  # stops 5 steps into draft tuning
    assert main([*args[:3], "--resume", "last", *args[3:], "draft_tuning.steps=12"]) == 0
    resumed = safe_load(tmp_path / "dt" / "checkpoints" / "last.ckpt")
    whole = safe_load(draft_run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == whole["global_step"] == 32
    for k, v in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][k], v), k


def test_generate_pool_is_greedy_text_of_the_model(loss_model):
    model, _ = loss_model(n=3, r=2, V=6)
    model.train()
    prompts = torch.tensor([[1, 2, 3], [4, 0, 5]])
    pool = generate_pool(model, prompts, 5, "marginal", batch_size=1)
    assert model.training  # the mode is restored
    assert pool.shape == (2, 8) and torch.equal(pool[:, :3], prompts)
    model.eval()
    assert pool[:, 3:].tolist() == generate_ar(model, prompts, 5).tokens


def test_sampled_pool_is_the_seeded_sampled_text_of_the_model(loss_model):
    model, _ = loss_model(n=3, r=2, V=6)
    model.eval()
    prompts = torch.tensor([[1, 2, 3], [4, 0, 5]])
    hot = Sampling(temperature=1.0)

    def pool(seed):
        return generate_pool(model, prompts, 6, "marginal", sampling=hot,
                             generator=torch.Generator().manual_seed(seed))

    first = pool(7)
    assert torch.equal(first, pool(7))  # the seed alone fixes it: every rank and a resume agree
    assert torch.equal(first[:, :3], prompts)
    expected = generate_ar(model, prompts, 6, sampling=hot, generator=torch.Generator().manual_seed(7)).tokens
    assert first[:, 3:].tolist() == expected
    greedy = generate_pool(model, prompts, 6, "marginal")
    assert not torch.equal(first, greedy) and not torch.equal(first, pool(8))


def test_mixed_pool_samples_its_first_rows_and_continues_the_rest_greedily(loss_model):
    model, _ = loss_model(n=3, r=2, V=6)
    model.eval()
    prompts = torch.tensor([[1, 2, 3], [4, 0, 5], [2, 2, 1], [0, 5, 3]])
    hot = Sampling(temperature=1.0)
    seen = []
    pool = mixed_pool(model, prompts, 6, "marginal", 3, hot, torch.Generator().manual_seed(7),
                      on_batch=seen.append)
    sampled = generate_pool(model, prompts[:3], 6, "marginal", sampling=hot,
                            generator=torch.Generator().manual_seed(7))
    assert torch.equal(pool[:3], sampled)
    assert torch.equal(pool[3:], generate_pool(model, prompts[3:], 6, "marginal"))
    assert seen == [3, 4]  # the progress counts over the whole pool
    assert torch.equal(mixed_pool(model, prompts, 6, "marginal", 0, hot), generate_pool(model, prompts, 6, "marginal"))


def test_soft_draft_tuning_on_a_mixed_pool_changes_only_the_draft_maps(draft_run, tmp_path, tb_scalars):
    ckpt_dir = tmp_path / "dt_soft" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    start = ckpt_dir / "step20.ckpt"
    start.write_bytes((draft_run / "checkpoints" / "best-step0000020.ckpt").read_bytes())
    assert main(["fit", "--resume", str(start), *FAST, "draft_tuning.steps=12", "draft_tuning.temperature=1.0",
                 "draft_tuning.sampled_fraction=0.5", "draft_tuning.soft_weight=0.5"]) == 0
    before, soft = safe_load(start), safe_load(ckpt_dir / "last.ckpt")
    greedy = safe_load(draft_run / "checkpoints" / "last.ckpt")
    assert soft["global_step"] == 32
    changed = sorted(k for k, v in before["state_dict"].items() if not torch.equal(v, soft["state_dict"][k]))
    assert changed == ["model.heads.draft_weight"]
    assert not torch.equal(soft["state_dict"]["model.heads.draft_weight"],
                           greedy["state_dict"]["model.heads.draft_weight"])
    scalars = tb_scalars(tmp_path / "dt_soft")
    for tag in ("train/draft_kl_per_token", "train/draft_nll_per_token"):  # logged in the draft steps only
        steps = [step for step, _ in scalars[tag]]
        assert steps and min(steps) > 20, tag


def test_a_split_pool_needs_a_sampling_temperature(tmp_path, capsys):
    assert main(["fit", "--config", CONF, f"run.root={tmp_path}", "draft_tuning.steps=2",
                 "draft_tuning.sampled_fraction=0.5"]) == 2
    assert "draft_tuning.sampled_fraction=0.5" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_resume_at_the_boundary_into_sampled_draft_tuning(draft_run, tmp_path):
    # a checkpoint at trainer.max_steps resumed straight into draft tuning, with the progress bar on (its
    # tokens/s once read a throughput monitor that had seen no batch) and a sampled pool
    ckpt_dir = tmp_path / "dt_hot" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    start = ckpt_dir / "step20.ckpt"
    start.write_bytes((draft_run / "checkpoints" / "best-step0000020.ckpt").read_bytes())
    args = ["fit", "--resume", str(start), *FAST, "trainer.progress_bar=true", "draft_tuning.steps=12"]
    assert main([*args, "draft_tuning.temperature=1.0"]) == 0
    before, hot = safe_load(start), safe_load(ckpt_dir / "last.ckpt")
    greedy = safe_load(draft_run / "checkpoints" / "last.ckpt")
    assert hot["global_step"] == 32
    changed = sorted(k for k, v in before["state_dict"].items() if not torch.equal(v, hot["state_dict"][k]))
    assert changed == ["model.heads.draft_weight"]
    # another pool, so other draft maps than the greedy run's
    assert not torch.equal(hot["state_dict"]["model.heads.draft_weight"],
                           greedy["state_dict"]["model.heads.draft_weight"])
