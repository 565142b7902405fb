import torch

from msn.decoding.tree import compile_tree
from msn.decoding.verify import greedy_verify

SPEC = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))


def run(ids, pred):
    t = compile_tree(SPEC)
    v = greedy_verify(t, torch.tensor(ids), torch.tensor(pred))
    return int(v.accepted), int(v.best), int(v.bonus)


def test_nothing_accepted_gives_root_prediction():
    # inputs: root, a, b, aa, ab, ba, aaa
    assert run([9, 1, 2, 3, 4, 5, 6], [7, 0, 0, 0, 0, 0, 0])[0::2] == (0, 7)


def test_longest_accepted_path_wins():
    # root predicts 1 (node 1 ok); node 1 predicts 4 (node 4 = 'ab' ok); node 4 predicts 8.
    acc, best, bonus = run([9, 1, 2, 3, 4, 5, 6], [1, 4, 0, 0, 8, 0, 0])
    assert (acc, bonus) == (2, 8)
    assert best == 0  # leaf row [1, 4]


def test_deep_chain_fully_accepted():
    acc, best, bonus = run([9, 1, 2, 3, 4, 5, 6], [1, 3, 0, 6, 0, 0, 42])
    assert (acc, best, bonus) == (3, 2, 42)


def test_tie_prefers_the_longer_path():
    # Only node 1 accepted; leaf rows [1,4] and [1,3,6] tie, the deeper one is chosen.
    acc, best, _ = run([9, 1, 2, 3, 4, 5, 6], [1, 0, 0, 0, 0, 0, 0])
    assert acc == 1 and best == 2
