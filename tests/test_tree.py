"""Greedy tree verification (``decoding/tree.py``): the candidate tree on hand-written factors, exact
tokens and counts on stubs (never / always / partly accepted, a branch other than the first winning), one
tree pass against the same paths fed as chains, and greedy parity with AR on tiny GPT and Hugging Face
models. Sampled trees: ``test_tree_sampling.py``."""

from __future__ import annotations

import math

import pytest
import torch

from mtp_lightning.config import TreeConfig, load_config
from mtp_lightning.decoding import Sampling, generate_ar, generate_speculative
from mtp_lightning.decoding.tree import DraftTree, build_tree, generate_tree, tree_summary
from mtp_lightning.errors import UserError
from tests.stubs import ALWAYS, NEVER, PARTLY, TreeStub, chain

pytestmark = pytest.mark.usefixtures("one_thread")


def soft(peaks: list[int], V: int = 4, high: float = 0.7) -> torch.Tensor:
    """One distribution per offset (k, V): ``high`` on the peak, the rest spread evenly."""
    out = torch.full((len(peaks), V), (1 - high) / (V - 1))
    out[torch.arange(len(peaks)), torch.tensor(peaks)] = high
    return out


def example_factors() -> tuple[torch.Tensor, torch.Tensor]:
    """``build_tree``'s worked example: pi (2,), probs (k=2, r=2, V=4); expert 0 predicts 1 then 2,
    expert 1 predicts 3 then 0."""
    return torch.tensor([0.3, 0.7]), torch.stack([soft([1, 2]), soft([3, 0])], 1)


def as_lists(t: DraftTree) -> tuple:
    return t.tokens, t.parents, t.depths, t.sources


# ---- the candidate tree -----------------------------------------------------------------------------


def test_tree_of_the_worked_example():
    pi, probs = example_factors()
    # q_1 = (0.10, 0.28, 0.10, 0.52): the chain takes 3, then q_2 = (0.665, 0.1, 0.137, 0.1) takes 0;
    # expert 1's chain [3, 0] is the same; branches [1] and [3, 2] (source r + 1 = 3)
    tree = build_tree(pi, probs, width=2, experts=1, budget=4)
    assert as_lists(tree) == ([3, 0, 1, 2], [0, 1, 0, 1], [1, 2, 1, 2], [0, 0, 3, 3])
    mask = tree.mask()
    assert mask.ancestors.int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                             [1, 0, 0, 1, 0], [1, 1, 0, 0, 1]]
    assert mask.depth.tolist() == [0, 1, 2, 1, 2]


def test_tree_admits_candidates_in_order_within_the_budget():
    pi, probs = example_factors()
    # both experts: expert 0's own chain [1, 2] comes before the branches; [1] is then already in
    tree = build_tree(pi, probs, width=2, experts=2, budget=5)
    assert as_lists(tree) == ([3, 0, 1, 2, 2], [0, 1, 0, 3, 1], [1, 2, 1, 2, 2], [0, 0, 1, 1, 3])
    # a budget of 3 keeps the chain and the first node of expert 0's
    assert as_lists(build_tree(pi, probs, 2, 2, 3)) == ([3, 0, 1], [0, 1, 0], [1, 2, 1], [0, 0, 1])
    # width 1, no expert: the chain decoder's draft alone
    assert as_lists(build_tree(pi, probs, 1, 0, 12)) == ([3, 0], [0, 1], [1, 2], [0, 0])
    # width 3: q_1's third token and q_2's second and third, once 0.05 more on token 0 at offset 2 and
    # on token 3 at offset 3 break the ties of the even spread
    probs[0, :, 0] += 0.05
    probs[1, :, 3] += 0.05
    assert as_lists(build_tree(pi, probs, 3, 0, 12)) == ([3, 0, 1, 0, 3, 2], [0, 1, 0, 0, 1, 1],
                                                         [1, 2, 1, 1, 2, 2], [0, 0, 3, 3, 3, 3])


def test_accept_follows_the_verifier_and_names_the_winner():
    pi, probs = example_factors()
    tree = build_tree(pi, probs, 2, 2, 5)  # nodes 1:3, 2:0 (under 1), 3:1, 4:2 (under 3), 5:2 (under 1)
    assert tree.accept([3, 2, 9, 9, 9, 9]) == [1, 5] and tree.winner([1, 5]) == 3
    assert tree.accept([1, 9, 9, 2, 9, 9]) == [3, 4] and tree.winner([3, 4]) == 1
    assert tree.accept([3, 0, 9, 9, 9, 9]) == [1, 2] and tree.winner([1, 2]) == 0
    assert tree.accept([2, 9, 9, 9, 9, 9]) == [] and tree.winner([]) == -1


# ---- stubs: exact tokens and counts ---------------------------------------------------------------


def tree_decode(model, prompt, n, **tree):
    return generate_speculative(model, [prompt], n, draft_len=3, tree=TreeConfig(enabled=True, **tree))


def test_stub_always_and_never_accepted():
    # width 1: the stub's other tokens tie, so a top-k branch would be an arbitrary one of them
    always = tree_decode(TreeStub([ALWAYS]), [0], 10, width=1)
    assert always.tokens == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]]
    assert (always.accepted, always.drafted, always.winners) == ([[3, 3, 0]], [[3, 3, 0]], [[0, 0, -1]])
    assert always.tree_sizes == [[3, 3, 0]]
    never = tree_decode(TreeStub([NEVER]), [0], 10, width=1)
    assert never.tokens == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]]
    assert never.accepted == [[0] * 9] and never.drafted == [[3, 3, 3, 3, 3, 3, 2, 1, 0]]
    assert never.winners == [[-1] * 9]


def test_stub_partly_accepted():
    gen = tree_decode(TreeStub([PARTLY]), [3], 10, width=1)
    assert gen.tokens == [[4, 5, 6, 7, 8, 9, 0, 1, 2, 3]]
    assert gen.accepted == [[1, 1, 1, 1, 0]] and gen.winners == [[0, 0, 0, 0, -1]]


def test_stub_a_branch_other_than_the_first_wins():
    # expert 0 holds 90% of the router weight and is wrong after offset 1; expert 1 is right. The chain
    # follows expert 0 and is never accepted; the tree also holds expert 1's chain, which wins
    wrong = chain(lambda s: 0 if s == 1 else 5)
    model = TreeStub([wrong, ALWAYS], log_w=(math.log(0.9), math.log(0.1)))
    assert generate_speculative(model, [[0]], 10, draft_len=3).accepted == [[0] * 9]
    gen = tree_decode(model, [0], 10)
    assert gen.tokens == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]]
    assert gen.accepted == [[3, 3, 0]] and gen.winners == [[2, 2, -1]]  # source 1 + a, a = 1
    # after token 0 (c = 1): chain 8 9 0, expert 1's 2 3 4, branches 8 3 and 8 9 4 off the chain
    assert gen.tree_sizes == [[8, 8, 0]]
    assert tree_summary([gen]) == {"mean_size": 16 / 3, "max_size": 8,
                                   "winners": {"none": 1, "mixture": 0, "expert0": 0, "expert1": 2, "topk": 0}}


def test_refusals_name_the_setting():
    model = TreeStub([ALWAYS])
    on = TreeConfig(enabled=True)
    for sampling in (Sampling(), Sampling(1.0)):
        with pytest.raises(ValueError, match="one row at a time, got a batch of 2"):
            generate_tree(model, [[0], [1]], 5, on, sampling=sampling)


def test_config_range_checks():
    assert load_config(overrides=["spec.tree.enabled=true", "spec.tree.width=3"]).spec.tree.width == 3
    with pytest.raises(UserError) as e:
        load_config(overrides=["spec.tree.width=0", "spec.tree.experts=-1", "spec.tree.depth=9",
                               "spec.tree.budget=0"])
    msg = str(e.value)
    for part in ("spec.tree.width=0 must be >= 1 (1 adds no branch beyond the chains)",
                 "spec.tree.experts=-1 must be >= 0 (0 adds no expert chain)",
                 "spec.tree.depth=9 must be at most model.heads.n_future - 1 = 3", "spec.tree.budget=0 must be >= 1"):
        assert part in msg


# ---- real trunks: one tree pass, and parity with AR ---------------------------------------------------


def assert_tree_pass_equals_chains(model, prompt: list[int], tokens: list[int], parents: list[int]):
    """One tree pass after ``prompt`` gives, at every node, the hidden state that feeding the node's path
    as a chain gives."""
    tree = DraftTree()
    for t, p in zip(tokens, parents):
        tree.tokens.append(t)
        tree.parents.append(p)
        tree.depths.append(1 if p == 0 else tree.depths[p - 1] + 1)
        tree.sources.append(0)
    fed = [prompt[-1]] + tokens
    with torch.inference_mode():
        cache = model.new_cache(1, 32)
        model.extend(torch.tensor([prompt[:-1]]), cache)
        z, _ = model.extend(torch.tensor([fed]), cache, tree=tree.mask())  # (1, T, D)
        for i in range(len(fed)):
            path, node = [], i
            while node:
                path.insert(0, fed[node])
                node = parents[node - 1]
            ref = model.new_cache(1, 32)
            want, _ = model.extend(torch.tensor([prompt + path]), ref)
            torch.testing.assert_close(z[0, i], want[0, -1], rtol=1e-5, atol=1e-5)


def assert_tree_parity(model, prompts, n, trees):
    """Greedy tree decoding == greedy AR for each prompt, verifier and tree; returns accepted, drafted."""
    accepted = drafted = 0
    for verifier in ("marginal", "lm_head"):
        for p in prompts:
            ref = generate_ar(model, [p], n, verifier=verifier).tokens
            for tree in trees:
                gen = generate_speculative(model, [p], n, verifier=verifier, tree=tree)
                assert gen.tokens == ref, f"tree differs from AR ({verifier}, {tree}, {p})"
                accepted += sum(gen.accepted[0])
                drafted += sum(gen.drafted[0])
    return accepted, drafted


TREES = [TreeConfig(enabled=True), TreeConfig(enabled=True, width=3, experts=3, budget=20),
         TreeConfig(enabled=True, width=1, experts=0, depth=2, budget=1)]


@pytest.mark.parametrize("kind", ["mlp", "block"])
def test_gpt_tree_pass_and_parity(decoding_model, kind):
    model = decoding_model(kind, 3)
    assert_tree_pass_equals_chains(model, [1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 0, 3, 1])
    accepted, drafted = assert_tree_parity(model, [[1, 2, 3, 4, 5], [7, 8]], 20, TREES)
    assert 0 < accepted < drafted


def test_gpt_tree_accepts_at_least_the_chain(decoding_model):
    """The tree holds the chain decoder's draft, so it never accepts less in a step from the same state;
    over whole decodes on this model it accepts more."""
    model = decoding_model("mlp", 3)
    chain_acc = tree_acc = 0
    for p in ([1, 2, 3, 4, 5], [7, 8], [9, 3, 1], [20, 21, 22]):
        chain_acc += sum(generate_speculative(model, [p], 30, draft_precision="full").accepted[0])
        tree_acc += sum(generate_speculative(model, [p], 30, draft_precision="full",
                                             tree=TreeConfig(enabled=True)).accepted[0])
    assert tree_acc > chain_acc


def test_hf_tree_pass_and_parity(hf_model, base_folder):
    hf = hf_model(base_folder).eval()
    assert_tree_pass_equals_chains(hf, [11, 12, 13, 14], [15, 16, 17, 18, 19], [0, 1, 0, 3, 1])
    accepted, drafted = assert_tree_parity(hf, [[30, 31, 32, 33], [40, 41]], 16, TREES[:2])
    assert drafted > 0 and accepted >= 0


def test_stub_stops_at_eos_as_the_chain_does():
    # the eos 3 is an accepted draft of the first step: its drafts before it count, it ends the row
    gen = generate_speculative(TreeStub([ALWAYS]), [[0]], 10, draft_len=3, eos_id=3,
                               tree=TreeConfig(enabled=True, width=1))
    assert gen.tokens == [[1, 2, 3]]
    assert (gen.accepted, gen.drafted) == ([[1]], [[1]])
    assert generate_speculative(TreeStub([ALWAYS]), [[0]], 10, draft_len=3, eos_id=3).accepted == [[1]]
