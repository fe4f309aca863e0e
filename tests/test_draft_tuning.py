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
from mtp_lightning.objectives.draft_tuning import draft_objective, generate_pool, pool_batch

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
