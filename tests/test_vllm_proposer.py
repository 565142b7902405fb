"""msn.vllm.MsnProposer without vLLM: the version gate, the drafts it hands vLLM for each
request of a batch, and that no other msn module imports vLLM. (tests/with_vllm runs it inside a
vLLM engine: scripts/test-vllm.sh.)"""

import collections
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import msn
from msn.decoding.history import find_continuation


def test_other_vllm_versions_are_refused_with_one_line():
    from msn.vllm import check_version

    check_version("0.32.0")
    check_version("0.32.1+cpu")
    for bad in ("0.31.2", "0.33.0", "1.0.0"):
        with pytest.raises(RuntimeError, match="written for vLLM 0.32") as err:
            check_version(bad)
        assert "\n" not in str(err.value) and bad in str(err.value)


def _proposer(monkeypatch, k=5, max_len=64, version="0.32.0"):
    import msn.vllm as mv

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__=version))
    from msn.vllm import MsnProposer

    cfg = types.SimpleNamespace(speculative_config=types.SimpleNamespace(num_speculative_tokens=k),
                                model_config=types.SimpleNamespace(max_model_len=max_len))
    return MsnProposer(cfg)


def test_a_wrong_vllm_is_refused_when_vllm_builds_the_proposer(monkeypatch):
    with pytest.raises(RuntimeError, match="this is vLLM 0.40.1"):
        _proposer(monkeypatch, version="0.40.1")


def test_each_request_gets_its_retrieval_chain_or_nothing(monkeypatch):
    """Row i drafts what followed the latest earlier occurrence of its final n-gram (the
    retrieval chain of tr-jacobi), at most K tokens and never past the model's length; a
    request with nothing to match, or not decoding this step, drafts nothing."""
    prop = _proposer(monkeypatch, k=4, max_len=24)
    rows = [[5, 6, 7, 8, 9, 1, 2, 5, 6], [1, 2, 3, 4], [3, 4, 5, 3, 4, 5, 3, 4], [9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8,
                                                                                 9, 8, 9, 8, 9, 8, 9, 8, 9, 8]]
    width = max(len(r) for r in rows) + 8
    table = np.zeros((len(rows) + 1, width), dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    lengths = np.array([len(r) for r in rows] + [3], dtype=np.int32)
    sampled = [[6], [4], [4], [8], []]           # the last row decodes nothing this step
    drafts = prop.propose(sampled, lengths, table)
    import torch

    assert drafts[0] == [7, 8, 9, 1] == find_continuation(torch.tensor(rows[0]), 3, 4, latest=True)
    assert drafts[1] == []                        # no earlier occurrence of any final n-gram
    assert drafts[2] == [5, 3, 4]                 # the latest occurrence, cut at the row's end
    assert len(drafts[3]) == 1                    # 22 of 24 positions used: room for one draft
    assert drafts[4] == []


def test_no_other_msn_module_imports_vllm():
    root = Path(msn.__file__).parent
    users = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if p.name != "vllm.py" and ("import vllm" in p.read_text() or "from vllm" in p.read_text())]
    assert users == []


def test_predictions_are_split_per_request():
    from msn.vllm import split_predictions

    assert split_predictions([1, 2, 3, 4, 5, 6, 7], [2, 0, 3]) == [[1, 2, 3], [4], [5, 6, 7]]


def _batch(rows, width=40):
    table = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table, np.array([len(r) for r in rows], dtype=np.int32)


def test_the_jacobi_chain_comes_from_the_last_verification_and_is_scored(monkeypatch):
    """With nothing retrieved, a request drafts the verification's predictions after its
    accepted prefix; the next step scores the chains it was offered against what the
    engine produced, and the better-scoring kind wins where both have guesses."""
    import msn.vllm as mv

    prop = _proposer(monkeypatch, k=3)
    row = [11, 12, 13, 14]                          # no repeated n-gram: retrieval finds nothing
    table, lengths = _batch([row])
    # The last verification fed [14, d1, d2, d3]; 1 draft accepted (sampled: it and the bonus).
    prop._predictions = [[20, 21, 22, 23]]
    assert prop.propose([[13, 14]], lengths, table) == [[22, 23]]    # predictions after d1 and d2
    # The engine then produced 22 and 30: the Jacobi chain had one right draft.
    table, lengths = _batch([row + [22, 30]])
    prop.propose([[22, 30]], lengths, table)
    assert list(prop.scores["jacobi"]) == [1]
    prop.scores["retrieval"].extend([0, 0])
    prop.scores["jacobi"].extend([2, 2])
    assert prop._choose({"retrieval": [1, 2], "jacobi": [3]}) == "jacobi"
    prop.scores["retrieval"].extend([3] * 20)
    assert prop._choose({"retrieval": [1, 2], "jacobi": [3]}) == "retrieval"


def test_a_poor_jacobi_chain_is_not_drafted_and_seeding_is_rare(monkeypatch):
    """Measured below MIN_JACOBI, a lone Jacobi chain is not drafted, and a request without
    guesses is seeded (noise from its history) on one step in SEED_EVERY only."""
    import msn.vllm as mv

    prop = _proposer(monkeypatch, k=3)
    prop.scores["jacobi"].extend([0] * 10)
    assert prop._choose({"retrieval": [], "jacobi": [5, 6]}) is None
    row = [11, 12, 13, 14]
    seeded = 0
    for _ in range(mv.SEED_EVERY * 3):
        table, lengths = _batch([row])
        drafts = prop.propose([[14]], lengths, table)[0]
        seeded += bool(drafts)
        assert set(drafts) <= set(row)
    assert seeded == 3


def test_chain_length_follows_measured_acceptance_and_step_cost(monkeypatch):
    """Whole chains while nothing is measured; then whole or none, whichever gives more expected
    tokens per second under the fitted step cost: none when drafts are rarely right and each fed
    token costs much, whole when they are right or tokens cost little."""
    prop = _proposer(monkeypatch, k=5)
    assert prop.step_cost() is None and prop.length("retrieval", 5, batch=1) == 5
    prop._steps = 1
    prop.scores["retrieval"].extend([0] * 18 + [5, 5])           # right 10 % of the time, then whole
    prop._costs.extend((n, 0.01 + 0.01 * n) for n in (1, 2, 4, 6, 1, 3, 5, 6, 2, 4))   # a token costs a step
    a, b = prop.step_cost()
    assert a == pytest.approx(0.01) and b == pytest.approx(0.01)
    assert prop.length("retrieval", 5, batch=1) == 0
    prop._costs.clear()
    prop._costs.extend((n, 0.05 + 0.0001 * n) for n in (1, 2, 4, 6, 1, 3, 5, 6, 2, 4))  # tokens nearly free
    assert prop.length("retrieval", 5, batch=1) == 5
    prop._steps = 16                                               # one step in FULL_EVERY: whole chains
    prop._costs.clear()
    prop._costs.extend((n, 0.01 + 0.01 * n) for n in (1, 2, 4, 6, 1, 3, 5, 6, 2, 4))
    assert prop.length("retrieval", 5, batch=1) == 5


def test_a_request_that_copies_drafts_where_the_average_one_would_not(monkeypatch):
    """The expectation is the request's own scored chains shrunk towards the kind's mean: with
    costly tokens a request whose chains were right drafts whole, one with no history of its own
    (or a new request in its row) does not; a batch of 8 shares the fixed cost, so it drafts
    less readily than one request alone."""
    prop = _proposer(monkeypatch, k=5)
    prop._steps = 1
    prop.scores["retrieval"].extend([0] * 20)
    prop._rows[3] = {"retrieval": collections.deque([5, 5, 5, 4])}
    prop._costs.extend((n, 0.02 + 0.01 * n) for n in (1, 2, 4, 6, 1, 3, 5, 6, 2, 4))
    assert prop.expected("retrieval", 3) == pytest.approx(19 / 6) and prop.expected("retrieval", 0) == 0
    assert prop.length("retrieval", 5, batch=1, row=3) == 5 and prop.length("retrieval", 5, batch=1, row=0) == 0
    prop.scores["retrieval"].clear()
    prop.scores["retrieval"].extend([1] * 20)                       # one right draft per chain on average
    prop._rows.clear()
    prop._costs.clear()
    prop._costs.extend((n, 0.05 + 0.005 * n) for n in (1, 2, 4, 6, 1, 3, 5, 6, 2, 4))
    assert prop.length("retrieval", 5, batch=1, row=0) == 5         # alone: the fixed cost pays for it
    assert prop.length("retrieval", 5, batch=8, row=0) == 0         # in a batch of 8 it does not
    table, lengths = _batch([[5, 6, 7, 8]])
    prop._rows[0] = {"retrieval": collections.deque([5])}
    prop._lengths[0] = 9
    prop._score(0, 4, table[0])                                     # shorter than before: another request
    assert 0 not in prop._rows


def test_the_hook_is_on_the_loading_runners_sampler_and_goes_with_the_proposer(monkeypatch):
    """load_model, called by the runner that holds the proposer as its drafter, puts a forward
    pre-hook on that runner's rejection sampler (its class untouched) which records each
    request's argmax; close() removes it; a caller that is not such a runner hooks nothing."""
    import torch

    class Sampler(torch.nn.Module):
        def forward(self, metadata, draft_probs, logits, sampling_metadata):
            logits.zero_()                              # a sampler may change the logits in place
            return "sampled"

    stock = Sampler.forward
    prop = _proposer(monkeypatch, k=3)

    class Runner:
        def __init__(self):
            self.drafter, self.rejection_sampler, self.model = prop, Sampler(), object()

        def load_model(self):
            self.drafter.load_model(self.model)

    runner = Runner()
    runner.load_model()
    logits = torch.tensor([[0.0, 9, 0], [5, 0, 0], [0, 0, 7], [0, 1, 0]])
    meta = types.SimpleNamespace(num_draft_tokens=[2, 0])
    assert runner.rejection_sampler(meta, None, logits, None) == "sampled"
    assert prop._predictions == [[1, 0, 2], [1]] and Sampler.forward is stock
    assert "forward" not in vars(runner.rejection_sampler)
    prop.close()
    prop._predictions = []
    runner.rejection_sampler(meta, None, torch.ones(4, 3), None)
    assert prop._predictions == [] and not runner.rejection_sampler._forward_pre_hooks
    stranger = _proposer(monkeypatch, k=3)
    with pytest.warns(UserWarning, match="retrieval chains only"):
        stranger.load_model(object())
    assert stranger._hook is None
