"""The online-round pieces shared by external-reward DPO, self-rewarding DPO and SPIN."""

from rlhf.data.examples import PreferencePair
from rlhf.data.tokenizer import CharTokenizer
from rlhf.rounds import RoundPairs, load_or_make, round_batches, round_path
from rlhf.tasks.builtin import ALPHABET

TOK = CharTokenizer(ALPHABET)


def test_round_batches_index_round_and_step():
    make = round_batches(3)
    assert [make(i, 0, 1).tolist() for i in range(7)] == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [2, 0]]


def test_chunks_make_one_pass_and_split_across_ranks():
    pairs = [PreferencePair("sort: ba\n", "ab", c) for c in "cdefghij"]
    data = RoundPairs.build(pairs, [[-1.0, -2.0]] * 8, pairs[0], TOK, 64, seed=0, r=0)
    assert sorted(data.order) == list(range(8)) and not data.empty
    one_rank = [i for step in range(4) for i in data.chunk(step, 4, 0, 1)]
    assert sorted(one_rank) == list(range(8))  # 4 steps of 2: every pair once
    two_ranks = [i for step in range(4) for rank in range(2) for i in data.chunk(step, 4, rank, 2)]
    assert sorted(two_ranks) == list(range(8))  # the ranks split each step's pairs
    # the order is a function of (seed, round)
    assert RoundPairs.build(pairs, None, pairs[0], TOK, 64, 0, 0).order == data.order
    assert RoundPairs.build(pairs, None, pairs[0], TOK, 64, 0, 1).order != data.order


def test_an_empty_round_holds_a_stand_in():
    stand_in = PreferencePair("sort: ba\n", "ab", "ab")
    data = RoundPairs.build([], None, stand_in, TOK, 64, 0, 0)
    assert data.empty and len(data.pairs) == 1 and data.ref.tolist() == [[0.0, 0.0]]
    rows = [{"prompt": "sort: ba\n", "status": "tie", "candidates": [{"response": "ab"}, {"response": "ab"}]}]
    assert RoundPairs.best_vs_worst(rows, True, TOK, 64, 0, 0).empty


def test_load_or_make_reloads_instead_of_making_again(tmp_path):
    path = round_path(tmp_path, 2)
    assert path == tmp_path / "rounds" / "round_002.jsonl"
    made = []
    rows, reloaded = load_or_make(path, lambda: made.append(1) or [{"index": 0, "x": 1.5}], True)
    assert rows == [{"index": 0, "x": 1.5}] and not reloaded and made == [1]
    rows, reloaded = load_or_make(path, lambda: made.append(1) or [], True)
    assert rows == [{"index": 0, "x": 1.5}] and reloaded and made == [1]
