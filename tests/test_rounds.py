"""The online-round pieces shared by external-reward DPO, self-rewarding DPO and SPIN."""

import torch

from rlhf.data.examples import PreferencePair
from rlhf.models import CharTokenizer
from rlhf.preference_batch import encode_pair
from rlhf.rounds import RoundPairs, load_or_make, mark_finished, round_batches, round_path, row_pair
from rlhf.sampling import SamplingConfig, generate_responses
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


class _Scripted(torch.nn.Module):
    """Greedy stand-in: a row whose prompt starts with "a" ends at once (EOS); any other row
    writes "c" until the token limit."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def decode_step(self, tokens, cache=None, seq_start_pos=None):
        logits = torch.zeros(tokens.shape[0], TOK.vocab_size)
        ends = tokens[torch.arange(tokens.shape[0]), seq_start_pos] == TOK.encode("a")[0]
        logits[ends, TOK.eos_id] = 1.0
        logits[~ends, TOK.encode("c")[0]] = 1.0
        return logits, None


def test_a_generation_cut_off_at_the_limit_is_unfinished_and_trained_without_eos():
    responses, finished = generate_responses(_Scripted(), TOK, ["a", "b"], SamplingConfig(max_new_tokens=3, temperature=0.0), batch_size=2)
    assert responses == ["", "ccc"] and finished == [True, False]
    # a pair's unfinished side gets no EOS, its finished side does
    pair = encode_pair(PreferencePair("b", "ab", "ccc", True, False), TOK, 64)
    assert pair.chosen == TOK.encode("ab") + [TOK.eos_id] and pair.rejected == TOK.encode("ccc")
    # round rows carry the flags (rows written before them count as finished)
    candidates = [{"response": "ab", "finished": True}, {"response": "ccc", "finished": False}]
    row = {"prompt": "b", "status": "pair", "chosen": "ab", "rejected": "ccc"}
    assert row_pair(row) == PreferencePair("b", "ab", "ccc")
    mark_finished(row, candidates)
    assert row["chosen_finished"] and not row["rejected_finished"]
    data = RoundPairs.best_vs_worst([{**row, "candidates": candidates}], False, TOK, 64, 0, 0)
    assert data.pairs[0].rejected == TOK.encode("ccc") and data.pairs[0].chosen[-1] == TOK.eos_id
    # the same text written once to the end and once cut off counts as finished
    mark_finished(row, candidates + [{"response": "ccc", "finished": True}])
    assert row["rejected_finished"]
