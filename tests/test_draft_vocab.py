"""The draft vocabulary (``model.heads.draft_vocab``, ``model/draft_vocab.py``): a deterministic frequency
ranking, the loss and distillation over V' + "other" against hand-written references, greedy speculative
output identical to AR with V' < V (GPT trunk and a tiny Hugging Face Llama), sampled speculative
decoding with the verifier's distribution (chi-square), and the ranking set by ``fit`` from the training
split and saved in the checkpoint."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mtp_lightning.config import BackboneConfig, GPTConfig, HeadsConfig, LossConfig, ModelConfig
from mtp_lightning.decoding import Sampling, generate_ar, generate_speculative
from mtp_lightning.model.cp_model import CPModel
from mtp_lightning.model.draft_vocab import column_of, frequency_ranking
from mtp_lightning.objectives.cp_loss import cp_objective
from mtp_lightning.objectives.distill import distill_objective, offset_weights

CONF = str(Path(__file__).resolve().parent.parent / "conf" / "smoke.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")


def draft_model(vocab: int = 50, draft_vocab: int = 16, kind: str = "mlp", rank: int = 3, n_future: int = 4,
                seed: int = 0) -> CPModel:
    """A random 2-layer d=32 GPT trunk whose heads predict over ``draft_vocab`` ids: every other id
    (0, 2, 4, ...), so the verifier's tokens fall both inside and outside the draft vocabulary."""
    torch.manual_seed(seed)
    cfg = ModelConfig(gpt=GPTConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=64, vocab_size=vocab),
                      heads=HeadsConfig(n_future=n_future, rank=rank, kind=kind, draft_vocab=draft_vocab))
    model = CPModel(cfg).eval()
    with torch.no_grad():
        model.trunk.wte.weight.mul_(3.0)
        model.trunk.wpe.weight.mul_(10.0)
        model.heads.draft_ids.copy_(torch.arange(draft_vocab) * 2)
        model.heads.other_row.normal_()
    return model


def test_frequency_ranking_is_deterministic_and_breaks_ties_by_id():
    counts = np.array([3, 9, 0, 3, 9, 1, 3])
    assert frequency_ranking(counts, 5).tolist() == [1, 4, 0, 3, 6]
    assert frequency_ranking(torch.tensor(counts), 2).tolist() == [1, 4]
    assert column_of(torch.tensor([4, 1, 0]), 6).tolist() == [2, 1, 3, 3, 0, 3]
    with pytest.raises(ValueError, match="between 1 and the vocabulary size 7"):
        frequency_ranking(counts, 8)


def test_cp_loss_over_the_draft_vocabulary_equals_the_reference():
    model = draft_model(vocab=50, draft_vocab=16, rank=2, n_future=3)
    torch.manual_seed(1)
    B, T, n = 2, 7, 3
    idx = torch.randint(0, 50, (B, T))
    targets = torch.randint(0, 50, (B, T, n))
    classes = model.head_targets(targets)
    assert 0 < int((classes == 16).sum()) < classes.numel()  # both kinds of target
    ids = model.heads.draft_ids
    assert torch.equal(classes[classes < 16], (targets[classes < 16] // 2))
    with torch.no_grad():
        z, states = model(idx)
        cfg = LossConfig(balance="none", next_token_weight=0.0)
        terms = cp_objective(model.heads, z, states, model.head_unembedding(other=True), classes, cfg)
        rows = torch.cat([model.unembedding[ids], model.heads.other_row[None]])  # (V'+1, D)
        logw = model.heads.router_logits(z).log_softmax(-1)  # (B, T, r)
        joint = logw.clone()
        for s in range(n):
            lp = (model.heads.expert_vectors(states[s], s) @ rows.T).log_softmax(-1)  # (B, T, r, V'+1)
            joint = joint + lp.gather(-1, classes[:, :, None, s:s + 1].expand(B, T, 2, 1))[..., 0]
        want = -torch.logsumexp(joint, -1).mean()
    assert torch.allclose(terms.joint_nll, want, atol=1e-5), (terms.joint_nll, want)


def test_loss_gradient_reaches_only_the_draft_rows_and_other():
    model = draft_model(vocab=50, draft_vocab=16, rank=2, n_future=2).train()
    z = torch.randn(2, 5, 32)
    targets = torch.randint(0, 50, (2, 5, 2))
    U = model.unembedding
    terms = cp_objective(model.heads, z, model.heads.offset_states(z), model.head_unembedding(other=True),
                         model.head_targets(targets), LossConfig())
    terms.loss.backward()
    touched = U.grad.abs().sum(1) > 0  # (V,)
    assert touched.nonzero()[:, 0].tolist() == model.heads.draft_ids.sort().values.tolist()
    assert model.heads.other_row.grad.abs().sum() > 0


def test_distillation_restricted_to_the_draft_vocabulary_equals_the_reference():
    model = draft_model(vocab=50, draft_vocab=16, rank=2, n_future=2)
    torch.manual_seed(2)
    z = torch.randn(2, 6, 32)
    base_z = torch.randn(2, 6, 32)
    targets = torch.randint(0, 50, (2, 6, 2))
    classes = model.head_targets(targets)
    states = model.heads.offset_states(z)
    ids = model.heads.draft_ids
    cfg = LossConfig(distill_beta=0.7, distill_gamma=0.5)
    with torch.no_grad():
        d = distill_objective(model.heads, z, states, model.head_unembedding(other=True), base_z,
                              lambda x: model.lm_logits(x, ids), classes, cfg, kl_cols=16)
        rows = torch.cat([model.unembedding[ids], model.heads.other_row[None]])
        logw = model.heads.router_logits(z).log_softmax(-1)  # (B, T, r)
        kls, ces = [], []
        for s in range(2):
            M = 6 - s
            lp = (model.heads.expert_vectors(states[s][:, :M], s) @ rows.T).log_softmax(-1)  # (B, M, r, V'+1)
            logq = torch.logsumexp(logw[:, :M, :, None] + lp, 2)  # (B, M, V'+1)
            logp = (base_z[:, s:] @ model.unembedding[ids].T).log_softmax(-1)  # (B, M, V')
            logq_v = logq[..., :16].log_softmax(-1)  # q renormalised over the V' ids
            kls.append((logp.exp() * (logp - logq_v)).sum(-1).mean())
            ces.append(-logq.gather(-1, classes[:, :M, s:s + 1])[..., 0].mean())
        kl, ce = torch.stack(kls), torch.stack(ces)
    assert torch.allclose(d.kl, kl, atol=1e-5) and torch.allclose(d.ce, ce, atol=1e-5)
    want = (offset_weights(2, 0.5) * (0.7 * kl + 0.3 * ce)).sum()
    assert torch.allclose(d.loss, want, atol=1e-5)


@pytest.mark.parametrize("kind,rank", [("mlp", 3), ("linear", 1), ("block", 2)])
def test_greedy_speculative_with_a_draft_vocabulary_equals_ar(kind, rank, greedy_parity):
    model = draft_model(kind=kind, rank=rank)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11], [4], [30, 31, 2, 40]]
    accepted, drafted = greedy_parity(model, prompts, 24, verifiers=("lm_head",), draft_lens=[1, 3],
                                             draft_precision="full")
    assert 0 < accepted < drafted
    out = generate_ar(model, prompts, 24, verifier="lm_head").tokens
    flat = [t for row in out for t in row]
    assert any(t % 2 for t in flat) and any(t % 2 == 0 for t in flat)  # tokens outside and inside V'
    if kind == "mlp":  # int8 drafts (auto on the CPU) over the draft vocabulary: the same tokens
        greedy_parity(model, prompts[:2], 16, verifiers=("lm_head",), draft_lens=[3])


def test_trees_with_a_draft_vocabulary():
    """Greedy trees over the heads' columns, mapped back to token ids, keep AR's tokens (c inside and
    outside V'); sampled trees draw ids of V' only and have candidates accepted."""
    from mtp_lightning.config import TreeConfig

    model = draft_model()
    tree = TreeConfig(enabled=True, width=3)
    accepted = 0
    for p in ([1, 2, 3], [7, 8, 9, 10, 11], [30, 31, 2, 40]):
        ref = generate_ar(model, [p], 20, verifier="lm_head").tokens
        gen = generate_speculative(model, [p], 20, verifier="lm_head", tree=tree)
        assert gen.tokens == ref
        accepted += sum(gen.accepted[0])
        sampled = generate_speculative(model, [p], 20, verifier="lm_head", tree=tree, sampling=Sampling(1.0),
                                       generator=torch.Generator().manual_seed(0))
        accepted += sum(sampled.accepted[0])
    assert accepted > 0


@pytest.mark.slow
def test_sampled_trees_with_a_draft_vocabulary_have_the_verifier_distribution():
    """Tokens 2 and 3 of rows decoded with sampled trees (both from one tree step when its candidates
    are kept) against the verifier's exact joint, as the chain's test above."""
    from mtp_lightning.config import TreeConfig
    from mtp_lightning.model import fastpath

    model, prompt, n = sampling_model(), [1, 2], 6_000
    want = verifier_pairs(model, prompt)
    gen, seen, accepted = torch.Generator().manual_seed(0), Counter(), 0
    with torch.inference_mode(), fastpath.decoding():
        for _ in range(n):
            out = generate_speculative(model, [prompt], 3, verifier="lm_head", sampling=Sampling(1.0),
                                       generator=gen, tree=TreeConfig(enabled=True, width=3, experts=1))
            seen[tuple(out.tokens[0][1:3])] += 1
            accepted += sum(out.accepted[0])
    assert accepted > 0.1 * n
    assert chi_square_p(seen, want, n) > 1e-3


def test_marginal_verifier_is_refused_with_a_draft_vocabulary():
    model = draft_model()
    with pytest.raises(ValueError, match="marginal verifier needs the heads' full vocabulary"):
        generate_speculative(model, [[1, 2]], 4, verifier="marginal")


def test_greedy_speculative_with_a_draft_vocabulary_on_a_tiny_hf_model(tmp_path, greedy_parity, tiny_hf,
                                                                      training_texts):
    pytest.importorskip("transformers")
    from mtp_lightning.data.tokenizer import Tokenizer

    folder = tiny_hf(tmp_path / "llama", "llama")
    cfg = ModelConfig(backbone=BackboneConfig(kind="hf", name_or_path=str(folder)),
                      heads=HeadsConfig(n_future=4, rank=2, kind="mlp", draft_vocab=64))
    model = CPModel(cfg).eval()
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    counts = np.bincount(np.concatenate([np.asarray(tok.encode(t)) for t in training_texts(20_000)]),
                         minlength=model.unembedding.shape[0])
    with torch.no_grad():
        model.heads.draft_ids.copy_(frequency_ranking(counts, 64))
    prompts = [tok.encode("def main(argv):\n    "), tok.encode("import os\n"), tok.encode("class A:")]
    accepted, drafted = greedy_parity(model, prompts, 20, verifiers=("lm_head",), draft_lens=[3],
                                             draft_precision="full")
    assert drafted > 0


def chi_square_p(observed: Counter, expected: dict, n: int) -> float:
    """Pearson's test of counts against probabilities, with cells of expected count < 5 pooled."""
    stat, df, pooled_o, pooled_e = 0.0, -1, 0.0, 0.0
    for cell, p in expected.items():
        e = n * p
        if e < 5:
            pooled_o += observed.get(cell, 0)
            pooled_e += e
            continue
        stat += (observed.get(cell, 0) - e) ** 2 / e
        df += 1
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / max(pooled_e, 1e-12)
        df += 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def sampling_model() -> CPModel:
    """10 ids, a 4-id draft vocabulary {0, 2, 4, 6}, n_future=3: a speculative step drafts 2 tokens."""
    model = draft_model(vocab=10, draft_vocab=4, rank=2, n_future=3, seed=3)
    with torch.no_grad():
        model.trunk.wte.weight.mul_(0.15)  # a spread-out verifier: every cell has mass
    return model


def verifier_pairs(model: CPModel, prompt: list[int]) -> dict:
    """The verifier's exact distribution of (token 2, token 3) after the prompt, enumerated."""
    V = model.unembedding.shape[0]

    def next_probs(seq):
        z, _ = model(torch.tensor([seq]))
        return model.lm_logits(z[0, -1]).float().softmax(-1)

    out = Counter()
    with torch.no_grad():
        p1 = next_probs(prompt)
        for a in range(V):
            p2 = next_probs(prompt + [a])
            for b in range(V):
                p3 = next_probs(prompt + [a, b])
                for c in range(V):
                    out[(b, c)] += float(p1[a] * p2[b] * p3[c])
    return dict(out)


def sampled_pairs(model: CPModel, prompt: list[int], n: int) -> tuple[Counter, int]:
    """(token 2, token 3) of n sampled speculative rows (both from one step), and the accepted drafts."""
    gen = torch.Generator().manual_seed(0)
    seen, accepted = Counter(), 0
    for _ in range(n // 3000):
        out = generate_speculative(model, [prompt] * 3000, 3, verifier="lm_head", draft_len=2,
                                   sampling=Sampling(temperature=1.0), generator=gen, draft_precision="full")
        seen.update((row[1], row[2]) for row in out.tokens)
        accepted += sum(map(sum, out.accepted))
    return seen, accepted


def test_sampled_speculative_with_a_draft_vocabulary_has_the_verifier_distribution():
    """Tokens 2 and 3 of each row come from one speculative step: their joint frequencies over 12,000
    rows must match the verifier's exact joint distribution."""
    model, prompt, n = sampling_model(), [1, 2], 12_000
    want = verifier_pairs(model, prompt)
    assert sum(v for (b, c), v in want.items() if b not in (0, 2, 4, 6)) > 0.3  # mass outside V'
    seen, accepted = sampled_pairs(model, prompt, n)
    assert accepted > 0.1 * n  # the drafts are taken often enough to matter
    assert chi_square_p(seen, want, n) > 1e-3


def test_the_chi_square_catches_a_wrong_acceptance_rule(monkeypatch):
    """The test above can fail: accepting every draft (no min(1, p/q)) gives a distribution far from
    the verifier's."""
    from mtp_lightning.decoding import speculative

    monkeypatch.setattr(speculative, "acceptance_prob", lambda p_d, q_d: torch.ones_like(p_d))
    model, prompt, n = sampling_model(), [1, 2], 3000
    seen, _ = sampled_pairs(model, prompt, n)
    assert chi_square_p(seen, verifier_pairs(model, prompt), n) < 1e-6


def test_fit_sets_the_ranking_from_the_training_split_and_saves_it(tmp_path, tb_scalars):
    from mtp_lightning.checkpoints.io import load_for_inference
    from mtp_lightning.cli import main
    from mtp_lightning.config import load_config
    from mtp_lightning.training.train import build_data_and_module

    args = [f"run.root={tmp_path}", "run.name=dv", "trainer.progress_bar=false", "trainer.max_steps=4",
            "trainer.val_check_interval=4", "checkpoint.every_n_steps=4", "trainer.log_every_n_steps=2",
            "model.heads.draft_vocab=64", "spec.verifier=lm_head", "model.loss.lm_head_weight=1.0"]
    assert main(["fit", "--config", CONF, *args]) == 0
    cfg = load_config([CONF], args)
    dm, module, tok = build_data_and_module(cfg)
    counts = np.bincount(np.load(dm.split_path("train")), minlength=tok.vocab_size)
    want = sorted(range(tok.vocab_size), key=lambda i: (-counts[i], i))[:64]
    assert module.model.heads.draft_ids.tolist() == want
    model, _, _ = load_for_inference(tmp_path / "dv" / "checkpoints" / "last.ckpt")
    assert model.heads.draft_ids.tolist() == want
    tags = tb_scalars(tmp_path / "dv")
    coverage = tags["train/draft_vocab_coverage"][-1][1]
    assert 0.3 < coverage < 1.0 and "val/joint_nll" in tags and "spec/mean_acceptance_length" in tags
    prompts = dm.val_prompts(2, 16).tolist()
    assert generate_speculative(model, prompts, 12, verifier="lm_head").tokens == \
        generate_ar(model, prompts, 12, verifier="lm_head").tokens


def test_config_refuses_the_marginal_verifier_and_a_too_large_draft_vocabulary(tmp_path):
    from mtp_lightning.config import load_config
    from mtp_lightning.errors import UserError
    from mtp_lightning.training.train import build_data_and_module

    with pytest.raises(UserError, match="spec.verifier=marginal verifies with the heads' own offset-1"):
        load_config([CONF], ["model.heads.draft_vocab=64"])
    with pytest.raises(UserError, match=r"model.heads.draft_vocab=-1 must be >= 0"):
        load_config([CONF], ["model.heads.draft_vocab=-1", "spec.verifier=lm_head"])
    cfg = load_config([CONF], ["model.heads.draft_vocab=512", "spec.verifier=lm_head"])
    with pytest.raises(UserError, match="model.heads.draft_vocab=512 must be below the vocabulary size 512"):
        build_data_and_module(cfg)


def test_heads_only_fit_with_distillation_over_a_draft_vocabulary(tmp_path, tb_scalars, tiny_hf, fit_args):
    pytest.importorskip("transformers")
    from mtp_lightning.checkpoints.io import load_for_inference
    from mtp_lightning.cli import main

    folder = tiny_hf(tmp_path / "gpt2", "gpt2")
    assert main(fit_args(folder, tmp_path, "dv", "model.heads.draft_vocab=96", "model.loss.distill_weight=1.0",
                         "trainer.max_steps=3")) == 0
    tags = tb_scalars(tmp_path / "dv")
    assert tags["train/distill_kl"][-1][1] > 0 and "train/draft_vocab_coverage" in tags
    model, tok, _ = load_for_inference(tmp_path / "dv" / "checkpoints" / "last.ckpt")
    assert len(set(model.heads.draft_ids.tolist())) == 96
    prompts = [tok.encode("def f(x):\n"), tok.encode("import sys\n")]
    assert generate_speculative(model, prompts, 10, verifier="lm_head").tokens == \
        generate_ar(model, prompts, 10, verifier="lm_head").tokens


def test_frozen_draft_rows_skip_their_gradient_and_change_nothing_else():
    """Heads-only: U is frozen, so the loss spends no product on its V' rows' gradient; the heads' and
    the "other" row's gradients are the same as with the full gradient computed."""
    model = draft_model(vocab=50, draft_vocab=16, rank=2, n_future=2).train()
    model.trunk.requires_grad_(False)
    assert model.head_frozen_rows == 16
    torch.manual_seed(4)
    z = torch.randn(2, 5, 32)
    targets = model.head_targets(torch.randint(0, 50, (2, 5, 2)))
    base_z = torch.randn(2, 5, 32)
    grads = []
    for frozen in (0, 16):
        model.heads.zero_grad(set_to_none=True)
        states = model.heads.offset_states(z)
        U = model.head_unembedding(other=True)
        loss = cp_objective(model.heads, z, states, U, targets, LossConfig(chunk_size=3), frozen_rows=frozen).loss
        loss = loss + distill_objective(model.heads, z, states, U, base_z,
                                        lambda x: model.lm_logits(x, model.heads.draft_ids), targets,
                                        LossConfig(chunk_size=3), kl_cols=16, frozen_rows=frozen).loss
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.heads.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "other_row" in grads[0]
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k
