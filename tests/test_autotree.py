"""--tree auto: scoring steps against the truth, the nested family, and the choice."""

import pytest
import torch

import msn
from msn.decoding.autotree import (Latency, Outcome, StepRecord, accepted, candidates, choose_tree, node_order,
                                   score)
from msn.decoding.tree import REFERENCE_TREE, validate_paths


def test_score_reads_ranks_and_retrieval_against_the_truth():
    rec = StepRecord(start=10, table=[[5, 6, 7], [8, 9, 1], [], []], retrieved=[6, 1, 4, 4])
    o = score(rec, [6, 1, 3, 2])
    assert o.ranks == (1, 2, None, None) and o.retrieved == 2 and o.guessed
    unguessed = score(StepRecord(start=0, table=[[], [], [], []], retrieved=[9, 9, 9, 9]), [1, 2, 3, 4])
    assert unguessed.ranks == (None,) * 4 and unguessed.retrieved == 0 and not unguessed.guessed


def test_accepted_counts_the_longest_path_in_the_tree_or_the_chain():
    o = Outcome(ranks=(0, 1, 0, None), retrieved=2, guessed=True)
    assert accepted(o, frozenset({(0,), (0, 1), (0, 1, 0)}), False) == 3
    assert accepted(o, frozenset({(0,), (0, 0)}), False) == 1
    assert accepted(o, frozenset({(0,), (0, 0)}), True) == 2
    assert accepted(o, frozenset(), False) == 0


def test_candidates_expect_the_mean_accepted_drafts_of_their_tree():
    """Each candidate's expected tokens per step is 1 + the mean of ``accepted`` over the
    scored steps it is judged on (steps with guesses when it has top-K nodes; every step
    otherwise), for random outcomes."""
    import random

    rng = random.Random(0)
    latency = Latency({1: 0.05, 69: 0.2})
    for _ in range(50):
        outcomes = [Outcome(tuple(rng.choice([None, 0, 0, 1, 2, 4, 9]) for _ in range(rng.randint(0, 5))),
                            rng.randint(0, 5), rng.random() < 0.7) for _ in range(rng.randint(1, 120))]
        guessed = [o for o in outcomes if o.guessed]
        for c in candidates(outcomes, latency, 5):
            basis = guessed if c.nodes else outcomes
            mean = sum(accepted(o, frozenset(c.nodes), c.retrieval) for o in basis) / len(basis)
            assert c.expected_tokens == pytest.approx(1 + mean)


def test_every_prefix_of_the_order_is_a_tree():
    outcomes = [Outcome((1, 0, 2, 0), 0, True), Outcome((0, 3, None, None), 0, True),
                Outcome((1, 0, 0, 0), 0, True)] * 3
    order = node_order(outcomes)
    assert sorted(order) == sorted(REFERENCE_TREE)
    assert order[:2] == [(1,), (1, 0)]
    for k in range(1, len(order) + 1):
        validate_paths(order[:k])            # raises when a prefix is not prefix-closed


def test_steep_latency_and_little_acceptance_choose_the_root_alone():
    cpu = Latency({1: 0.10, 2: 0.20, 8: 0.24, 16: 0.35, 69: 0.64})
    few = [Outcome((0, None, None, None), 0, True)] * 2 + [Outcome((None,) * 4, 0, True)] * 8
    c = choose_tree(few, cpu, retrieve_len=5)
    assert c.inputs == 1 and not c.nodes and not c.retrieval


def test_flat_latency_and_high_acceptance_choose_a_big_tree():
    gpu = Latency({1: 0.030, 69: 0.031})
    good = [Outcome((0, 0, 1, 0), 0, True), Outcome((0, 1, 0, None), 0, True), Outcome((1, 0, 0, 0), 0, True)] * 5
    c = choose_tree(good, gpu, retrieve_len=5)
    assert len(c.nodes) >= 8 and c.expected_tokens > 3.5


def test_good_retrieval_alone_chooses_the_chain():
    cpu = Latency({1: 0.10, 6: 0.22, 69: 0.64})
    copying = [Outcome((None,) * 4, 5, False)] * 10
    c = choose_tree(copying, cpu, retrieve_len=5)
    assert c.retrieval and not c.nodes and c.inputs == 6
    assert {(len(x.nodes) > 0) for x in candidates(copying, cpu, 5)} == {False}   # no top-K evidence, no top-K tree


def test_the_chain_alone_costs_what_retrieval_found():
    """The retrieval chain alone feeds only the retrieved tokens, so steps where retrieval
    found nothing cost a one-token step: rare but long hits pay for the chain."""
    cpu = Latency({1: 0.10, 6: 0.22, 69: 0.64})
    rare = [Outcome((None,) * 4, 5, False, found=5)] * 2 + [Outcome((None,) * 4, 0, False, found=0)] * 8
    chain = next(c for c in candidates(rare, cpu, 5) if c.retrieval and not c.nodes)
    assert chain.expected_tokens == pytest.approx(2.0)
    assert chain.tokens_per_s == pytest.approx(2.0 / ((2 * 0.22 + 8 * 0.10) / 10))
    assert choose_tree(rare, cpu, retrieve_len=5).retrieval
    unknown = [Outcome(o.ranks, o.retrieved, o.guessed) for o in rare]      # stored before found was kept
    chain = next(c for c in candidates(unknown, cpu, 5) if c.retrieval and not c.nodes)
    assert chain.tokens_per_s == pytest.approx(2.0 / 0.22)
    assert not choose_tree(unknown, cpu, retrieve_len=5).retrieval


def test_the_chain_alone_proposes_only_what_was_retrieved():
    """With the chain alone chosen, a step drafts the retrieved tokens and nothing else: none
    found is the root alone (no candidates built), a short match a shorter chain, a full one the whole chain."""
    from msn.decoding.history import TokenHistory
    from msn.decoding.proposers import AutoTreeJacobi
    from msn.decoding.tree import chain

    auto = AutoTreeJacobi(torch.device("cpu"), latency=Latency({1: 0.1, 69: 0.6}), retrieve_len=5,
                          retrieve_ngram=2)
    auto._use((), True)
    auto.explore = False
    for tokens, retrieved in (([1, 2, 3, 4, 5, 6, 7, 8], []), ([1, 2, 3, 9, 1, 2], [3, 9, 1, 2]),
                              ([4, 5, 1, 2, 3, 4, 5, 6, 1, 2], [3, 4, 5, 6, 1])):
        paths, cand = auto.propose(TokenHistory(tokens, seed=0))
        assert paths == tuple(chain(len(retrieved), column=auto.k))
        if retrieved:
            assert cand[: len(retrieved), auto.k].tolist() == retrieved
        else:
            assert cand is None      # the root alone: no candidate table is built
        auto.pending.clear()


def test_a_new_generations_own_steps_displace_earlier_runs_quickly():
    """A prompt unlike the last ones takes over within a few scored steps: the basis starts
    from the latest PRIOR stored steps of a kind, and each own step of that kind displaces
    DISPLACE of them."""
    from msn.decoding.proposers import AutoTreeJacobi

    auto = AutoTreeJacobi(torch.device("cpu"), latency=Latency({1: 0.1, 69: 0.6}), retrieve_len=5,
                          retrieve_ngram=2)
    old = [Outcome((0, 0, 0, 0), 5, True) for _ in range(50)]
    auto.prior = old
    assert auto._basis() == old[-auto.PRIOR:]
    own = [Outcome((None,) * 4, 0, True) for _ in range(3)]
    auto.outcomes = own
    keep = auto.PRIOR - auto.DISPLACE * 3
    assert auto._basis() == old[-keep:] + own
    auto.outcomes = own * (auto.PRIOR // auto.DISPLACE)
    assert auto._basis() == auto.outcomes            # earlier runs' steps are gone
    plain = [Outcome((None,) * 4, 2, False)]
    auto.prior = old + plain
    assert auto._basis() == auto.outcomes + plain    # the other kind keeps its own prior


def test_exploring_costs_at_most_its_share_of_plain_steps():
    """With the root alone chosen and a top-K tree within reach, one step in
    ``explore_interval`` runs the tree: seldom when t(tree) >> t(1) (a CPU), every
    ``explore_every`` steps when a step of many inputs costs what one costs (a GPU)."""
    from msn.decoding.proposers import AutoTreeJacobi

    few = [Outcome((0, None, None, None), 0, True)] * 4 + [Outcome((None,) * 4, 0, True)] * 28
    for lat, flat in ((Latency({1: 0.10, 8: 0.24, 69: 0.64}), False), (Latency({1: 0.030, 69: 0.031}), True)):
        auto = AutoTreeJacobi(torch.device("cpu"), latency=lat, retrieve_len=5, retrieve_ngram=2)
        auto.outcomes = list(few)
        auto._reselect(None)
        assert auto.explore and not auto.choice.nodes
        extra = lat(len(auto.explore_paths) + 1) / lat(1) - 1
        assert extra / auto.explore_interval <= auto.EXPLORE_COST + 1e-9
        assert (auto.explore_interval == auto.explore_every) == flat


def test_latency_interpolates_and_extends():
    lat = Latency({1: 1.0, 3: 2.0, 5: 4.0})
    assert lat(2) == pytest.approx(1.5) and lat(4) == pytest.approx(3.0) and lat(7) == pytest.approx(6.0)
    assert lat(0) == 1.0
    assert Latency({1: 2.0})(69) == 2.0          # one point: flat, for any input count


def test_auto_tree_is_lossless_and_reports_its_choice(models):
    model = models("mistral")
    x = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])
    want = msn.generate(model, x, method="ar", max_new_tokens=70, eos_token_id=[]).tokens
    r = msn.generate(model, x, method="tr-jacobi", tree="auto", max_new_tokens=70, eos_token_id=[])
    assert r.tokens == want
    assert r.info["tree"] == "auto" and r.info["choices"] and "1" in r.info["latency"]["ms"]
    # Which tree wins follows the step times measured on this machine; its size does not:
    # the root, at most the reference tree's 63 nodes and (merged drafts, the default) the
    # recycled tree's nodes, and the retrieval chain when it is used.
    from msn.decoding.recycle import RECYCLE_TEMPLATE
    from msn.decoding.tree import REFERENCE_TREE

    assert r.info["drafts"] == "merged"
    for c in r.info["choices"]:
        assert 0 <= c["topk_nodes"] <= len(REFERENCE_TREE) and 0 <= c["recycled_nodes"] <= len(RECYCLE_TEMPLATE)
        assert c["inputs"] == 1 + c["topk_nodes"] + c["recycled_nodes"] + (5 if c["retrieval"] else 0), c


def test_profile_accounts_for_every_step_of_every_method(models):
    from msn.decoding.profile import PARTS, StepProfile

    model = models("llama")
    x = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8]])
    for method, used in (("ar", {"forward"}),
                         ("tr-jacobi", {"forward", "inputs", "verification", "host_sync", "cache", "proposer"})):
        prof = StepProfile()
        r = msn.generate(model, x, method=method, tree="small", max_new_tokens=30, eos_token_id=[], profile=prof) \
            if method == "tr-jacobi" else msn.generate(model, x, method=method, max_new_tokens=30, eos_token_id=[],
                                                       profile=prof)
        rep = prof.report()
        assert rep["steps"] == r.steps > 0
        assert {p for p in PARTS if prof.seconds[p] > 0} == used
        assert sum(prof.seconds.values()) <= r.decode_s
