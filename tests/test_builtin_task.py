import random

import pytest

from rlhf.errors import ConfigError
from rlhf.tasks import TaskConfig
from rlhf.tasks.builtin import (
    CLIMB_LETTERS,
    BuiltinTask,
    answer,
    arrange_letters,
    careless_answer,
    arrangement,
    judge_label,
    judge_verdict,
    parse_climb_prompt,
    parse_path_prompt,
    score,
    verifier_reward,
)


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


@pytest.mark.parametrize("families", [["sort", "add"], ["path"], ["arrange"]])
def test_examples_are_consistent_with_the_verifier(families):
    task = BuiltinTask(TaskConfig(families=families))
    rng = random.Random(1)
    for _ in range(200):
        ex = task.sft_example(rng)
        assert score(ex.prompt, ex.response) == 1.0
        pair = task.preference_pair(rng)
        assert score(pair.prompt, pair.chosen) == 1.0 and score(pair.prompt, pair.rejected) < 1.0
        judged = task.judge_example(rng)
        assert judged.prompt.startswith("judge ") and "score: " in judged.response and judged.response[-1].isdigit()
        assert all(ch in task.tokenizer.alphabet for ch in judged.prompt + judged.response)


def test_difficulty_knob_changes_lengths():
    easy = BuiltinTask(TaskConfig(families=["sort"], sort_min_len=3, sort_max_len=4))
    hard = BuiltinTask(TaskConfig(families=["sort"], sort_min_len=15, sort_max_len=16))
    assert max(len(p) for p in easy.eval_prompts()) < min(len(p) for p in hard.eval_prompts())


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="families"):
        BuiltinTask(TaskConfig(families=["poetry"]))


# -- path: producing needs a choice of branch; checking needs only "is each hop an edge?" --

PATH = "path: bc ab ad de a>e\n"  # a star from a: a-b-c and a-d-e; the goal e ends the second


def test_path_answer_and_verifier_by_hand():
    assert answer(PATH) == "ade"
    assert score(PATH, "ade") == 1.0
    assert score(PATH, "abc") == 0.5  # every hop an edge, wrong end: half of 2/2
    assert score(PATH, "abe") == 0.25  # a wrong turn then the goal: half of 1/2
    assert score(PATH, "de") == 0.0  # does not begin at the start
    assert score(PATH, "a") == 0.0 and score(PATH, "") == 0.0
    assert score(PATH, "ade!") == pytest.approx(0.5 * 2 / 3)  # junk after the goal costs


def test_judge_labels_keep_exact_apart_from_near_misses():
    assert [judge_label(s) for s in (1.0, 0.99, 0.9, 0.5, 0.3, 0.1, 0.0)] == [5, 4, 4, 3, 2, 1, 0]


def test_judge_verdicts_by_hand():
    # the start, each hop, the goal
    assert judge_verdict(PATH, "ade") == "a+ ad+ de+ e+\nscore: 5"
    assert judge_verdict(PATH, "abc") == "a+ ab+ bc+ c-\nscore: 3"
    assert judge_verdict(PATH, "abe") == "a+ ab+ be- e+\nscore: 1"
    assert judge_verdict(PATH, "aa") == "a+ aa- a-\nscore: 0"
    assert judge_verdict(PATH, "") == "score: 0"
    assert judge_verdict(PATH, "a d") == "score: 0"  # not a path: no step-by-step checks
    assert judge_verdict("sort: cba\n", "abc") == "score: 5"
    assert judge_verdict("sort: cba\n", "acb") == "score: 2"  # 1/3 -> 1.67 rounds half up to 2


def test_path_prompts_have_one_path_and_the_knobs_hold():
    task = BuiltinTask(TaskConfig(families=["path"], path_min_branches=3, path_max_branches=3, path_min_hops=3, path_max_hops=3))
    rng = random.Random(3)
    for _ in range(200):
        prompt = task.train_prompt(rng)
        edges, start, goal = parse_path_prompt(prompt)
        assert len(edges) == 9 and len(answer(prompt)) == 4
        assert sum(e[0] == start for e in edges) == 3 and goal != start
        assert score(prompt, answer(prompt)) == 1.0 and task.family(prompt) == "path"


def test_path_judging_examples_cover_the_models_mistakes():
    task = BuiltinTask(TaskConfig(families=["path"]))
    rng = random.Random(4)
    labels = []
    for _ in range(400):
        ex = task.judge_example(rng)
        prompt = ex.prompt[len("judge ") : ex.prompt.index("answer ")]
        candidate = ex.prompt.split("answer ")[1][:-1]
        assert ex.response == judge_verdict(prompt, candidate) and ex.response.endswith(f"score: {judge_label(score(prompt, candidate))}")
        labels.append(judge_label(score(prompt, candidate)))
    # right paths, wrong turns then the goal, wrong branches walked to their end, near misses
    assert 0.2 < labels.count(5) / 400 < 0.4 and labels.count(3) > 40 and labels.count(1) + labels.count(2) > 120


# -- arrange: producing needs search (avoid dead ends); checking looks at neighbours only --


def test_arrangement_is_the_first_valid_ordering():
    assert arrangement("abc") is None  # b is a neighbour of both others
    assert arrangement("abcd") == "bdac"  # a... dead-ends (ac, then b or d both fail): search backs up
    assert arrangement("ace") == "ace"
    assert answer("arrange: ABCD\n") == "bdac"


def test_arrange_verifier_and_verdict_by_hand():
    p = "arrange: ABCD\n"  # capitals in the prompt, lower case in the answer
    assert arrange_letters(p) == "abcd"
    assert score(p, "bdac") == 1.0 and score(p, "cadb") == 1.0  # any valid ordering is right
    assert score(p, "abdc") == pytest.approx(0.5 * 1 / 3)  # an ordering with two neighbour pairs
    assert score(p, "bda") == pytest.approx(0.25 * 3 / 4)  # not an ordering: letters shared
    assert score(p, "BDAC") == 0.0  # the answer is written in lower case
    # neighbour pairs in the answer's letters, then each prompt letter as the prompt writes it
    assert judge_verdict(p, "cadb") == "ca+ ad+ db+ A+ B+ C+ D+ =+\nscore: 5"
    assert judge_verdict(p, "abdc") == "ab- bd+ dc- A+ B+ C+ D+ =+\nscore: 1"
    assert judge_verdict(p, "bda") == "bd+ da+ A+ B+ C- D+ =-\nscore: 1"  # c dropped: C- and the count
    assert judge_verdict(p, "bdab") == "bd+ da+ ab- A+ B+ C- D+ =+\nscore: 1"  # b twice in place of c
    assert judge_verdict(p, "bdae") == "bd+ da+ ae+ A+ B+ C- D+ =+\nscore: 1"  # e swapped in for c
    # every mark holds exactly when the answer is right
    task = BuiltinTask(TaskConfig(families=["arrange"], arrange_min_len=4, arrange_max_len=8))
    rng = random.Random(0)
    for _ in range(300):
        q = task.train_prompt(rng)
        c = task.judge_candidate(q, rng)
        assert ("-" not in judge_verdict(q, c).split("\n")[0]) == (score(q, c) == 1.0)


def test_arrange_judge_candidates_carry_the_models_letter_slips():
    task = BuiltinTask(TaskConfig(families=["arrange"]))
    rng = random.Random(1)
    kinds = {"right": 0, "ordering": 0, "letters": 0}
    for _ in range(600):
        q = task.train_prompt(rng)
        c = task.judge_candidate(q, rng)
        letters = arrange_letters(q)
        kinds["right" if score(q, c) == 1.0 else "ordering" if sorted(c) == sorted(letters) else "letters"] += 1
    # wrong letters are the judge's hard part (a substituted letter kept the length in 601 of 806)
    assert kinds["letters"] > 210 and kinds["ordering"] > 100 and kinds["right"] > 180


def test_neighbour_slip_puts_two_alphabet_neighbours_side_by_side():
    task = BuiltinTask(TaskConfig(families=["arrange"]))
    p = "arrange: ABDF\n"
    rng = random.Random(0)
    slips = {task.neighbour_slip("bdaf", rng) for _ in range(50)}
    assert slips == {"dabf", "badf"}  # b moved to just after a, or a to just after b
    assert all(sorted(s) == sorted("abdf") and score(p, s) < 1.0 for s in slips)
    assert task.neighbour_slip("aceg", rng) == "aceg"  # no neighbours to bring together


def test_arrange_prompts_are_solvable_and_dense():
    task = BuiltinTask(TaskConfig(families=["arrange"], arrange_min_len=6, arrange_max_len=6))
    rng = random.Random(5)
    prompts = [task.train_prompt(rng) for _ in range(200)]
    assert all(len(p) == len("arrange: ") + 7 and score(p, answer(p)) == 1.0 for p in prompts)
    assert all(p[9:-1].isupper() and answer(p).islower() for p in prompts)  # two cases: see arrange_letters
    # letters come from a narrow window: most prompts hold alphabet neighbours to keep apart
    assert sum(any(ord(b) - ord(a) == 1 for a, b in zip(p[9:-1], p[10:-1])) for p in prompts) > 150


def test_climb_answer_verifier_and_verdict_by_hand():
    p = "climb: c....j\n"  # 6 letters from c to j: a rise of 7 in 5 steps of 1 to 3
    assert parse_climb_prompt(p) == ("c", "j", 6)
    assert answer(p) == "cfghij"  # the longest step that keeps j reachable with steps of 1
    assert score(p, "cfghij") == 1.0 and score(p, "cdfhij") == 1.0  # any valid climb is right
    # ends one short: 8 checks (start, 5 steps, goal, length), the goal fails
    assert score(p, "cdefgi") == pytest.approx(0.5 * 7 / 8)
    assert score(p, "") == 0.0
    assert judge_verdict(p, "cfghij") == "c+ cf+ fg+ gh+ hi+ ij+ j+ =+\nscore: 5"
    assert judge_verdict(p, "cdefgi") == "c+ cd+ de+ ef+ fg+ gi+ i- =+\nscore: 2"
    assert judge_verdict(p, "cdefj") == "c+ cd+ de+ ef+ fj- j+ =-\nscore: 2"  # goal copied after a jump of 4
    assert judge_verdict(p, "cceghj") == "c+ cc- ce+ eg+ gh+ hj+ j+ =+\nscore: 2"  # a step of 0
    # the alphabet runs on from z to A
    assert answer("climb: y..C\n") == "yABC" and score("climb: y..C\n", "yzBC") == 1.0
    with pytest.raises(ValueError, match="not a climb prompt"):
        parse_climb_prompt("climb: cj\n")


def test_climb_prompts_are_reachable_and_judge_candidates_mix_right_and_wrong():
    task = BuiltinTask(TaskConfig(families=["climb"], climb_min_len=4, climb_max_len=12))
    rng = random.Random(3)
    right = 0
    for _ in range(400):
        q = task.train_prompt(rng)
        start, goal, n = parse_climb_prompt(q)
        rise = CLIMB_LETTERS.index(goal) - CLIMB_LETTERS.index(start)
        assert 4 <= n <= 12 and n - 1 <= rise <= 3 * (n - 1)
        assert score(q, answer(q)) == 1.0 and len(answer(q)) == n
        c = task.judge_candidate(q, rng)
        right += score(q, c) == 1.0
        # every mark holds exactly when the answer is right
        assert ("-" not in judge_verdict(q, c).split("\n")[0]) == (score(q, c) == 1.0)
    assert 100 < right < 180  # 30% the right climb, and random climbs that land by chance


def test_too_few_prompts_for_the_held_out_set_is_a_config_error():
    # 5-letter climbs: sum over rises 4..12 of (52 - rise) = 396 prompts in all
    with pytest.raises(ConfigError, match="distinct prompts in families"):
        BuiltinTask(TaskConfig(families=["climb"], climb_min_len=5, climb_max_len=5, num_eval_prompts=1000))
    task = BuiltinTask(TaskConfig(families=["climb"], climb_min_len=5, climb_max_len=5, num_eval_prompts=396))
    with pytest.raises(ConfigError, match="leave no training prompts"):
        task.train_prompt(random.Random(0))


def test_climb_lengths_are_checked():
    with pytest.raises(ConfigError, match="climb_min_len=2"):
        BuiltinTask(TaskConfig(families=["climb"], climb_min_len=2))
    with pytest.raises(ConfigError, match="climb_max_len=17"):
        BuiltinTask(TaskConfig(families=["climb"], climb_max_len=17))


def test_arrange_near_misses_include_the_slips_the_policy_writes():
    """corrupt (the reward model's and DPO's near misses) gives arrange answers with two alphabet
    neighbours side by side and all letters right: the blind spot of a reward model trained on
    random edits alone, which PPO climbed."""
    task = BuiltinTask(TaskConfig(families=["arrange"]))
    rng = random.Random(0)
    prompt = "arrange: BDEFGHIKMO\n"
    right = answer(prompt)
    neighbours = letters = 0
    for _ in range(300):
        near = task.corrupt(prompt, right, rng)
        assert near != right
        if sorted(near) != sorted(right):
            letters += 1
        elif any(abs(ord(a) - ord(b)) == 1 for a, b in zip(near, near[1:])):
            neighbours += 1
    assert neighbours >= 75 and letters >= 75, (neighbours, letters)  # 107 and 171 with seed 0; 1/3 are neighbour slips


def test_careless_demonstrators_skip_carries_and_sort_backwards():
    assert careless_answer("add: 48+57\n") == "95"  # 8+7 = 15 writes 5 and carries nothing; 4+5 = 9
    assert careless_answer("add: 999+1\n") == "990"
    assert careless_answer("add: 5+5\n") == "0"
    assert careless_answer("add: 123+456\n") == "579" == answer("add: 123+456\n")  # no carry: right
    assert careless_answer("sort: abca\n") == "cbaa"
    assert careless_answer("arrange: ABCD\n") == answer("arrange: ABCD\n")  # other families: right


def test_careless_demonstration_rate_sets_the_sft_data_and_the_pairs():
    draw = lambda rate, n=400: [BuiltinTask(TaskConfig(careless_demo_rate=rate)).sft_example(random.Random(i)) for i in range(n)]
    # rate 0 draws nothing extra: the same prompts as ever, every answer right
    assert all(ex.response == answer(ex.prompt) for ex in draw(0.0))
    assert [ex.prompt for ex in draw(0.0)] == [BuiltinTask(TaskConfig()).sft_example(random.Random(i)).prompt for i in range(400)]
    assert all(ex.response == careless_answer(ex.prompt) for ex in draw(1.0))
    half = [ex.response == careless_answer(ex.prompt) != answer(ex.prompt) for ex in draw(0.5)]
    assert 0.4 < sum(half) / len(half) < 0.6
    task = BuiltinTask(TaskConfig(careless_demo_rate=0.5))
    pairs = [task.preference_pair(random.Random(i)) for i in range(100)]
    assert all(p.chosen == answer(p.prompt) for p in pairs)
    assert all(p.rejected == careless_answer(p.prompt) for p in pairs if careless_answer(p.prompt) != p.chosen)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="careless_demo_rate"):
            BuiltinTask(TaskConfig(careless_demo_rate=bad))
