"""Decoding tests: exact tokens and counts on stubs, greedy parity with AR on tiny random models,
sampling exactness against enumerated verifier distributions, metrics, the teacher-forced estimate and
the benchmark (the Lightning callback: ``test_acceptance_callback.py``). The whole file runs in well
under a minute on 2 CPU cores."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from mtp_lightning.decoding import (Sampling, SpecAcceptance, format_table, generate_ar, generate_speculative,
                                    plot_per_position, run_benchmark, teacher_forced_acceptance)
from mtp_lightning.decoding import speculative
from mtp_lightning.decoding.speculative import resolve_draft_precision
from mtp_lightning.decoding.sampling import residual_logprobs, sample, warp_logprobs
from mtp_lightning.model import fastpath, native


from tests.stubs import ALWAYS, NEVER, PARTLY, StubModel, chain

pytestmark = pytest.mark.usefixtures("one_thread")



def counts(gen) -> dict:
    metric = SpecAcceptance(3)
    metric.update(*gen.step_counts())
    out = metric.compute()
    return {"steps": int(metric.steps), "accepted": gen.accepted[0], "drafted": gen.drafted[0],
            "histogram": out["histogram"].tolist(), "pos_accepted": metric.position_accepted.tolist(),
            "pos_drafted": metric.position_drafted.tolist(),
            "tau": round(float(out["mean_acceptance_length"]), 5)}


# ---- stubs: exact tokens and counts ---------------------------------------------------------------


@pytest.mark.parametrize("sampled", [False, True])
def test_stub_always_accepted(sampled):
    s = Sampling(1.0) if sampled else Sampling()
    gen = generate_speculative(StubModel([ALWAYS]), [[0]], 10, draft_len=3, sampling=s,
                               generator=torch.Generator().manual_seed(0))
    assert gen.tokens == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]]
    # prefill gives 1 token; steps keep 3 + 1, 3 + 1, then 0 + 1 (one token left: nothing to draft)
    assert counts(gen) == {"steps": 3, "accepted": [3, 3, 0], "drafted": [3, 3, 0], "histogram": [1, 0, 0, 2],
                           "pos_accepted": [2, 2, 2], "pos_drafted": [2, 2, 2], "tau": 3.0}


@pytest.mark.parametrize("sampled", [False, True])
def test_stub_never_accepted(sampled):
    s = Sampling(1.0) if sampled else Sampling()
    gen = generate_speculative(StubModel([NEVER]), [[0]], 10, draft_len=3, sampling=s,
                               generator=torch.Generator().manual_seed(0))
    assert gen.tokens == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]]
    assert counts(gen) == {"steps": 9, "accepted": [0] * 9, "drafted": [3, 3, 3, 3, 3, 3, 2, 1, 0],
                           "histogram": [9, 0, 0, 0], "pos_accepted": [0, 0, 0], "pos_drafted": [8, 7, 6],
                           "tau": 1.0}


@pytest.mark.parametrize("sampled", [False, True])
def test_stub_partly_accepted(sampled):
    s = Sampling(1.0) if sampled else Sampling()
    gen = generate_speculative(StubModel([PARTLY]), [[3]], 10, draft_len=3, sampling=s,
                               generator=torch.Generator().manual_seed(0))
    assert gen.tokens == [[4, 5, 6, 7, 8, 9, 0, 1, 2, 3]]
    assert counts(gen) == {"steps": 5, "accepted": [1, 1, 1, 1, 0], "drafted": [3, 3, 3, 2, 0],
                           "histogram": [1, 4, 0, 0], "pos_accepted": [4, 0, 0], "pos_drafted": [4, 4, 3],
                           "tau": 1.8}


def test_stub_posterior_conditions_on_the_verifier_token():
    # expert 1 carries 90% of the router weight but is wrong everywhere after offset 1, where it also
    # disagrees with the verifier; conditioning on c moves all the weight to expert 0, whose drafts are right
    wrong = chain(lambda s: 6)
    model = StubModel([ALWAYS, wrong], log_w=(math.log(0.1), math.log(0.9)))
    gen = generate_speculative(model, [[0]], 9, draft_len=3)
    assert gen.tokens == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert gen.accepted == [[3, 3]]
    # a draft that ignored c would follow the heavier expert and never be accepted
    flat = StubModel([wrong])
    assert generate_speculative(flat, [[0]], 9, draft_len=3).accepted == [[0] * 8]


def test_stub_batch_eos_and_rows_of_different_lengths():
    model = StubModel([ALWAYS])
    gen = generate_speculative(model, [[0], [5, 6, 7]], 10, draft_len=3, eos_id=4)
    # row 0 reaches eos inside the first step's accepted drafts; row 1 sees eos after 7 tokens
    assert gen.tokens == [[1, 2, 3, 4], [8, 9, 0, 1, 2, 3, 4]]
    # a draft that crosses eos is cut there: the drafts before it are accepted (and all the step could
    # keep), eos is the step's last token, so the m + 1 tokens per step are exactly the emitted ones
    assert gen.accepted == [[2], [3, 1]] and gen.drafted == [[2], [3, 1]]
    assert [sum(m + 1 for m in row) + 1 for row in gen.accepted] == [len(t) for t in gen.tokens]
    ar = generate_ar(model, [[0], [5, 6, 7]], 10, eos_id=4)
    assert ar.tokens == gen.tokens
    streamed = [[], []]
    gen = generate_speculative(model, [[0], [5, 6, 7]], 10, draft_len=2,
                               on_step=lambda new: [streamed[b].extend(t) for b, t in enumerate(new)])
    assert streamed == gen.tokens == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0], [8, 9, 0, 1, 2, 3, 4, 5, 6, 7]]


# ---- greedy parity on tiny random CPModels -----------------------------------------------------------


def test_eos_cuts_speculative_exactly_where_ar_stops(decoding_model):
    """On the GPT trunk, with eos ids that greedy decoding reaches (tokens of the first row where they
    first appear): AR and speculative decoding, per row and batched, stop at the first eos, and the
    acceptance counts add up to the emitted tokens, also where the eos was an accepted draft."""
    model = decoding_model("block", 3)  # its drafts are accepted at some first occurrences, not only in loops
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15]]
    full = [generate_ar(model, [p], 24).tokens[0] for p in prompts]
    plain = {k: generate_speculative(model, [prompts[0]], 24, draft_len=k) for k in range(1, model.n_future)}
    cut_drafts = 0
    for j in range(2, 24):
        eos = full[0][j]
        if eos in full[0][:j]:
            continue
        want = [row[: row.index(eos) + 1] if eos in row else row for row in full]
        assert generate_ar(model, prompts, 24, eos_id=eos).tokens == want
        for k in range(1, model.n_future):
            batch = generate_speculative(model, prompts, 24, draft_len=k, eos_id=eos)
            one = generate_speculative(model, [prompts[0]], 24, draft_len=k, eos_id=eos)
            assert batch.tokens == want and one.tokens == want[:1], f"eos {eos}, k={k}"
            for gen in (batch, one):
                assert [sum(m + 1 for m in row) + 1 for row in gen.accepted] == [len(t) for t in gen.tokens]
                assert all(a <= d <= k for ra, rd in zip(gen.accepted, gen.drafted) for a, d in zip(ra, rd))
            # without the eos, was position j an accepted draft rather than the last token of its step?
            ends = set(itertools.accumulate(m + 1 for m in plain[k].accepted[0]))
            cut_drafts += j not in ends
    assert cut_drafts > 0  # some eos was an accepted draft, so a draft was cut there


@pytest.mark.parametrize("kind,rank", list(itertools.product(["linear", "mlp", "block"], [1, 3])))
def test_greedy_parity_with_ar(greedy_parity, decoding_model, kind, rank):
    model = decoding_model(kind, rank)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15]]
    accepted, drafted = greedy_parity(model, prompts, 20)
    assert 0 < accepted < drafted  # both the accept and the reject paths ran


def test_greedy_parity_with_full_precision_drafts(greedy_parity, decoding_model):
    """The tests above draft through int8 weight copies (``auto`` on the CPU); full-precision drafts
    give the same tokens too."""
    accepted, drafted = greedy_parity(decoding_model("mlp", 3), [[1, 2, 3, 4, 5], [7, 8]], 20,
                                             draft_precision="full")
    assert 0 < accepted < drafted


def test_draft_precision_is_resolved_and_refused_where_unavailable(decoding_model):
    assert resolve_draft_precision("full", "cpu") is False
    assert resolve_draft_precision("auto", "cpu") is fastpath.int8_available()
    assert resolve_draft_precision("auto", "cuda") is False  # int8 drafts are a CPU path
    with pytest.raises(ValueError, match="draft_precision=int8 needs the CPU"):
        resolve_draft_precision("int8", "cuda")
    with pytest.raises(ValueError, match="is not one of auto, full, int8"):
        generate_speculative(decoding_model(), [[1]], 4, draft_precision="fp8")


def test_ranks_that_finish_early_keep_stepping_until_all_are_done(decoding_model):
    model = decoding_model()
    prompts = [[1, 2, 3], [4, 5]]
    plain = generate_speculative(model, prompts, 12)
    votes = []

    def sync_done(local_done: bool) -> bool:  # another rank needs two more steps than this one
        votes.append(local_done)
        return sum(votes) == 3

    synced = generate_speculative(model, prompts, 12, sync_done=sync_done)
    assert synced.tokens == plain.tokens and synced.accepted == plain.accepted
    assert synced.steps == plain.steps + 2  # the padding passes decode nothing and count nothing


def test_prompt_too_long_is_refused(decoding_model):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_speculative(decoding_model(), [[1] * 60], 10)
    with pytest.raises(ValueError, match="draft_len"):
        generate_speculative(decoding_model(), [[1]], 10, draft_len=4)


# ---- sampling exactness ----------------------------------------------------------------------------


def exact_distribution(model, prompt: list[int], n_tokens: int, s: Sampling) -> dict[tuple, float]:
    """P(x_1..x_n | prompt) under the warped verifier, by enumerating every continuation."""
    V = model.unembedding.shape[0]
    seqs = list(itertools.product(range(V), repeat=n_tokens))
    idx = torch.tensor([prompt + list(x) for x in seqs])  # (V^n, P + n)
    with torch.no_grad():
        z, states = model(idx)
        logp = warp_logprobs(model.verifier_logprobs(z, states, "marginal"), s)  # (V^n, P+n, V)
    P = len(prompt)
    steps = logp[:, P - 1: P - 1 + n_tokens].gather(-1, idx[:, P:, None]).squeeze(-1)  # (V^n, n)
    return {x: float(v) for x, v in zip(seqs, steps.sum(-1).exp())}


def chi_square(samples: list[tuple], probs: dict[tuple, float]) -> tuple[float, float]:
    """Pearson's statistic over outcomes pooled until each bin expects >= 5, and its 0.999 critical
    value (Wilson-Hilferty approximation of the chi-square quantile)."""
    N, seen = len(samples), Counter(samples)
    bins, obs, exp = [], 0, 0.0
    for x in sorted(probs, key=probs.get):
        obs, exp = obs + seen.get(x, 0), exp + N * probs[x]
        if exp >= 5:
            bins.append((obs, exp))
            obs, exp = 0, 0.0
    if exp > 0:
        o, e = bins.pop()
        bins.append((o + obs, e + exp))
    stat = sum((o - e) ** 2 / e for o, e in bins)
    df = len(bins) - 1
    z = 3.090  # standard normal 0.999 quantile
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _sampled_outcomes(decode, model, prompt, n_tokens, rows, s, seed):
    gen = decode(model, [prompt] * rows, n_tokens, sampling=s, generator=torch.Generator().manual_seed(seed))
    return [tuple(t) for t in gen.tokens]


SAMPLERS = [Sampling(1.0), Sampling(0.7, top_k=3), Sampling(1.3, top_p=0.8)]


@pytest.mark.parametrize("s", SAMPLERS, ids=["t1", "t0.7-topk3", "t1.3-topp0.8"])
def test_speculative_sampling_matches_the_verifier_distribution(decoding_model, s, monkeypatch):
    model = decoding_model("mlp", rank=2, vocab=4, n_future=3, seed=1, max_seq_len=16)
    with torch.no_grad():  # sharper, distinct factors, so drafts are often rejected and residuals matter
        noise = torch.randn(model.n_future, *model.heads.next_weight.shape)
        model.heads.next_weight.add_(noise[0])
        model.heads.draft_weight.add_(noise[1:])
    prompt, n_tokens, rows = [1, 2], 4, 12000
    probs = exact_distribution(model, prompt, n_tokens, s)
    spec = lambda *a, **kw: generate_speculative(*a, draft_len=2, **kw)  # noqa: E731
    stat, crit = chi_square(_sampled_outcomes(spec, model, prompt, n_tokens, rows, s, 0), probs)
    assert stat < crit, f"speculative sampling is off the verifier's distribution: chi2={stat:.1f} > {crit:.1f}"
    stat, crit = chi_square(_sampled_outcomes(generate_ar, model, prompt, n_tokens, rows, s, 1), probs)
    assert stat < crit, f"AR sampling is off the verifier's distribution: chi2={stat:.1f} > {crit:.1f}"
    # the test has power: accepting every draft (a wrong rule) must fail it
    monkeypatch.setattr(speculative, "acceptance_prob", lambda p, q: torch.ones_like(p))
    stat, crit = chi_square(_sampled_outcomes(spec, model, prompt, n_tokens, rows, s, 0), probs)
    assert stat > crit, f"a wrong acceptance rule went unnoticed: chi2={stat:.1f} <= {crit:.1f}"


def test_sampling_helpers():
    logp = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = warp_logprobs(logp, Sampling(1.0, top_k=2)).exp()
    assert torch.allclose(kept, torch.tensor([0.625, 0.375, 0, 0]))
    kept = warp_logprobs(logp, Sampling(1.0, top_p=0.8)).exp()  # 0.5 + 0.3 reaches 0.8: two tokens
    assert torch.allclose(kept, torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(warp_logprobs(logp, Sampling(0.5)).exp(), (logp * 2).softmax(-1))
    res = residual_logprobs(logp, torch.tensor([0.25, 0.25, 0.25, 0.25]).log()).exp()
    assert torch.allclose(res, torch.tensor([0.25, 0.05, 0, 0]) / 0.3)
    assert torch.allclose(residual_logprobs(logp, logp), logp)  # nothing left: fall back to p
    draws = sample(logp.expand(40000, 4), torch.Generator().manual_seed(0))
    assert torch.allclose(torch.bincount(draws, minlength=4) / 40000.0, logp.exp(), atol=0.01)


# ---- metrics, teacher-forced estimate, benchmark -----------------------------------------------------


def test_metric_compute_on_hand_written_counts():
    metric = SpecAcceptance(3)
    metric.update(torch.tensor([3, 0, 1]), torch.tensor([3, 3, 3]))
    metric.update(torch.tensor([2, 1]), torch.tensor([3, 2]))
    out = metric.compute()
    assert int(metric.drafted) == 14 and int(metric.accepted) == 7 and int(metric.steps) == 5
    assert int(metric.emitted) == 12
    assert out["acceptance_rate"].item() == pytest.approx(7 / 14)
    assert out["mean_acceptance_length"].item() == pytest.approx(12 / 5)
    assert out["per_position"].tolist() == pytest.approx([4 / 5, 2 / 5, 1 / 4])
    assert out["histogram"].tolist() == [1, 2, 1, 1]
    metric.reset()
    assert metric.compute()["mean_acceptance_length"].item() == 0.0


def test_metric_summary_keeps_per_position_a_vector_at_draft_length_1():
    metric = SpecAcceptance(1)
    metric.update(torch.tensor([1, 0, 1, 1]))
    out = metric.summary()
    assert out["per_position"].shape == (1,) and out["per_position"].tolist() == pytest.approx([0.75])
    assert out["mean_acceptance_length"].item() == pytest.approx(7 / 4) and out["histogram"].tolist() == [1, 3]


@pytest.mark.parametrize("tables,tau", [(ALWAYS, 4.0), (PARTLY, 2.0), (NEVER, 1.0)])
def test_teacher_forced_estimate_on_stub(tables, tau):
    model = StubModel([tables])
    windows = (torch.arange(20)[None] + torch.tensor([[0], [3], [7]])) % 10  # (3, 20), the verifier's chain
    for chunk in (1 << 23, 1):  # chunking does not change the answer
        out = teacher_forced_acceptance(model, windows, draft_len=3, chunk_elems=chunk)
        assert out["mean_acceptance_length"].item() == pytest.approx(tau)
        assert out["acceptance_rate"].item() == pytest.approx((tau - 1) / 3)


def test_benchmark_reports_and_plots(decoding_model, tmp_path):
    model = decoding_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    result = run_benchmark(model, prompts, max_new_tokens=12, batch_size=2, verifier="marginal", draft_len=0,
                           sampled=True)
    assert result["identical"] is True
    assert result["draft_len"] == 3 and len(result["per_position"]) == 3 and len(result["histogram"]) == 4
    h = result["histogram"]  # tau: the mean of (accepted + 1) over verification steps
    assert result["mean_acceptance_length"] == pytest.approx(sum((j + 1) * c for j, c in enumerate(h)) / sum(h))
    assert set(result) >= {"sampled_mean_acceptance_length", "sampled_acceptance_rate", "sampled_per_position"}
    assert "spec_tokens_per_s" in format_table(result)
    png = tmp_path / "per_position.png"
    plot_per_position(result, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG" and list(tmp_path.iterdir()) == [png]


def test_probability_space_verifier_and_draft_vectors_match_the_log_space_ones(decoding_model):
    """Greedy decoding's verifier in probability space is exp of the log-space one (same argmax), its
    factors are the log-space ones weighted by the router (w_a P_a^(1), summing to the marginal), and
    the draft's stacked-offset product equals one product per offset."""
    model = decoding_model()
    model.eval()
    idx = torch.randint(0, model.unembedding.shape[0], (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), fastpath.decoding():
        z, states = model(idx)
        lp, lf = model.verifier_and_factors(z, states, "marginal")
        p, pf = model.verifier_and_factors(z, states, "marginal", probs=True)
        torch.testing.assert_close(p, lp.exp(), rtol=1e-5, atol=1e-7)
        w = model.router_logw(z).exp()[..., None]  # (B, T, r, 1)
        torch.testing.assert_close(pf, lf.exp() * w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(pf.sum(-2), p, rtol=1e-5, atol=1e-7)
        assert torch.equal(p.argmax(-1), lp.argmax(-1))
        zt = [s[:, -1] for s in states]  # one position per row, as a draft sees it
        stacked = model.factor_logprobs(zt, range(1, model.n_future))
        one_by_one = torch.cat([model.factor_logprobs(zt, range(s, s + 1)) for s in range(1, model.n_future)], 1)
        torch.testing.assert_close(stacked, one_by_one, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(native.kernel() is None, reason="no native kernel here")
@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_fused_native_draft_equals_the_step_by_step_draft_and_keeps_parity(greedy_parity, decoding_model, kind):
    """With a vocabulary the kernel takes (64), greedy int8 drafts of one row go through one native call
    (``CPModel.fused_greedy_draft``); it gives the drafts of the step-by-step int8 path (factor logits,
    then the chain) and greedy decoding stays token-identical to AR, with drafts accepted and rejected."""
    model = decoding_model(kind, rank=3, vocab=64)
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode(), fastpath.decoding():
        for trial in range(20):
            u = torch.randn(1, 32, generator=g) * 4
            joint1 = torch.rand(1, 3, 64, generator=g) + 0.05
            c = torch.randint(0, 64, (1,), generator=g)
            pi = joint1[:, :, c[0]]  # (1, r): the posterior after c
            want = native.reference_chain(model.factor_logprobs([u] * 4, range(1, 4), int8=True, probs=True), pi)
            got = model.fused_greedy_draft(u, joint1, c, 3, 3)
            assert got is not None and torch.equal(got, want), (trial, got, want)
            assert torch.equal(model.fused_greedy_draft(u, joint1, c, 3, 2), want[:, :2])  # a shorter last step
        # a batch takes the step-by-step path, whose products take all rows at once
        assert model.fused_greedy_draft(u.expand(2, -1), joint1.expand(2, -1, -1), c.expand(2), 3, 3) is None
    calls = []
    real = native.greedy_draft
    try:
        native.greedy_draft = lambda *a, **k: calls.append(1) or real(*a, **k)
        accepted, drafted = greedy_parity(model, [[1, 2, 3, 4, 5], [7, 8]], 20, verifiers=("marginal",))
    finally:
        native.greedy_draft = real
    assert calls and 0 < accepted < drafted


def test_benchmark_interleaves_and_repeats_in_alternating_order(decoding_model):
    from mtp_lightning.decoding.bench import interleaved_order

    assert interleaved_order(2, 2) == [(0, 0, "ar"), (0, 0, "spec"), (0, 1, "spec"), (0, 1, "ar"),
                                       (1, 0, "ar"), (1, 0, "spec"), (1, 1, "spec"), (1, 1, "ar")]
    assert interleaved_order(1, 3) == [(0, 0, "ar"), (0, 0, "spec"), (1, 0, "spec"), (1, 0, "ar"),
                                       (2, 0, "ar"), (2, 0, "spec")]
    result = run_benchmark(decoding_model(), [[1, 2, 3], [4, 5]], max_new_tokens=8, repeats=3)
    assert result["identical"] is True and result["repeats"] == 3 and len(result["ar_seconds"]) == 3


def test_timing_warnings_name_unsteady_loaded_and_impossible_runs():
    from mtp_lightning.decoding.bench import timing_warnings

    assert timing_warnings([2.0, 2.4], [1.0, 1.1], 2.0, 2.9, 1.9, 2) == []
    assert timing_warnings([2.0, 58.0], [1.0, 1.0], 2.0, 2.9, None, 2) == [
        "AR runs took 2.00 to 58.00 s over 2 repeats (29.0x apart): the machine was not steady; rerun on a "
        "quiet machine or with more --repeats"]
    assert timing_warnings([2.0], [1.0], 2.0, 2.9, 2.5, 2) == [
        "the machine was loaded before the run (1-minute load average 2.50 on 2 cores): other processes "
        "share the CPUs, so the timings may not be this model's"]
    assert timing_warnings([2.0], [1.0], 2.6, 1.18, 0.1, 2) == [
        "speedup 2.60x exceeds tau 1.18 (tokens per verification pass), which the same model cannot do: a "
        "pass costs at least one AR step; the timings were disturbed"]
    assert timing_warnings([2.0], [1.0], 1.29, 1.18, 0.1, 2) == []  # within the 10% margin
