import random

import pytest

from rlhf.errors import ConfigError
from rlhf.tasks import TaskConfig
from rlhf.tasks.builtin import BuiltinTask, answer, score, verifier_reward


def test_answers():
    assert answer("sort: dcba\n") == "abcd"
    assert answer("add: 999+1\n") == "1000"


def test_verifier_partial_credit_by_hand():
    assert score("sort: cba\n", "abc") == 1.0
    assert score("sort: cba\n", "acb") == pytest.approx(1 / 3)  # only 'a' in place
    assert score("sort: cba\n", "abcx") == pytest.approx(3 / 4)  # junk costs
    assert score("sort: cba\n", "") == 0.0
    # numbers are compared right-aligned: 21 vs 1 -> units digit right, 1 of 2
    assert score("add: 12+9\n", "1") == pytest.approx(1 / 2)
    assert score("add: 12+9\n", "31") == pytest.approx(1 / 2)
    assert verifier_reward(["add: 1+1\n", "sort: ba\n"], ["2", "ba"]) == [1.0, 0.0]


def test_seeded_and_held_out_prompts_never_trained_on():
    task = BuiltinTask(TaskConfig(sort_min_len=2, sort_max_len=3, add_min_digits=1, add_max_digits=1, num_eval_prompts=100))
    held_out = set(task.eval_prompts())
    rng = random.Random(0)
    assert all(task.train_prompt(rng) not in held_out for _ in range(2000))
    assert BuiltinTask(TaskConfig()).eval_prompts() == BuiltinTask(TaskConfig()).eval_prompts()


def test_examples_are_consistent_with_the_verifier():
    task = BuiltinTask(TaskConfig())
    rng = random.Random(1)
    for _ in range(200):
        ex = task.sft_example(rng)
        assert score(ex.prompt, ex.response) == 1.0
        pair = task.preference_pair(rng)
        assert score(pair.prompt, pair.chosen) == 1.0 and score(pair.prompt, pair.rejected) < 1.0
        judged = task.judge_example(rng)
        assert judged.prompt.startswith("judge ") and judged.response.strip().isdigit()
        assert all(ch in task.tokenizer.alphabet for ch in judged.prompt + judged.response)


def test_difficulty_knob_changes_lengths():
    easy = BuiltinTask(TaskConfig(families=["sort"], sort_min_len=3, sort_max_len=4))
    hard = BuiltinTask(TaskConfig(families=["sort"], sort_min_len=15, sort_max_len=16))
    assert max(len(p) for p in easy.eval_prompts()) < min(len(p) for p in hard.eval_prompts())


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="families"):
        BuiltinTask(TaskConfig(families=["poetry"]))
