"""Self-rewarding DPO: pair selection, round statistics, and end-to-end runs (one process and DDP)."""

import json
import random
from pathlib import Path

import pytest

from conftest import TINY
from rlhf.config import typed_stage_config
from rlhf.errors import ConfigError
from rlhf.stages.self_reward_dpo import no_pair_cause, round_stats, select_pair


# ------------------------------------------------------------------------- pair selection


def test_select_pair_best_over_worst():
    out = select_pair(["a", "b", "c", "d"], [2.0, 4.5, 1.0, 4.5])
    # the first of equal best scores wins
    assert out == {"status": "pair", "chosen": "b", "rejected": "c", "chosen_score": 4.5, "rejected_score": 1.0}


def test_select_pair_ties_are_dropped():
    assert select_pair(["a", "b", "c"], [3.0, 3.0, 3.0])["status"] == "tie"
    assert select_pair(["a", "b"], [3.0, 3.4], min_gap=0.5)["status"] == "tie"
    assert select_pair(["a", "b"], [3.0, 3.6], min_gap=0.5)["status"] == "pair"


def test_select_pair_missing_scores():
    # unparseable judgements (None) are left out; fewer than two scored candidates: no pair
    assert select_pair(["a", "b", "c"], [None, None, 4.0])["status"] == "unparseable"
    assert select_pair(["a", "b"], [None, None])["status"] == "unparseable"
    assert select_pair(["a", "b", "c"], [None, 2.0, None])["status"] == "unparseable"
    out = select_pair(["a", "b", "c"], [None, 1.0, 4.0])
    assert (out["status"], out["chosen"], out["rejected"]) == ("pair", "c", "b")
    assert select_pair(["a", "b"], [float("nan"), 2.0])["status"] == "unparseable"


def test_select_pair_never_pits_a_response_against_itself():
    # two samples of the same text are one response with their mean score
    assert select_pair(["a", "a", "b"], [5.0, 1.0, 3.0])["status"] == "tie"
    assert select_pair(["a", "a"], [5.0, 1.0])["status"] == "tie"  # all the same text
    assert select_pair(["a", "a", "b"], [5.0, 1.0, None])["status"] == "tie"
    out = select_pair(["a", "a", "b"], [5.0, 4.0, 1.0])
    assert (out["chosen"], out["chosen_score"], out["rejected"]) == ("a", 4.5, "b")


def test_round_stats_counts():
    def cand(response, scores, verifier):
        ok = [s for s in scores if s is not None]
        return {"response": response, "judge_scores": scores, "score": sum(ok) / len(ok) if ok else None, "verifier": verifier}

    rows = [
        {"status": "pair", "candidates": [cand("ab", [5, 4], 1.0), cand("ba", [1, None], 0.0)], "chosen_verifier": 1.0, "rejected_verifier": 0.0},
        {"status": "pair", "candidates": [cand("x", [4, 4], 0.0), cand("yy", [2, 2], 0.5)], "chosen_verifier": 0.0, "rejected_verifier": 0.5},
        {"status": "tie", "candidates": [cand("a", [3, 3], 1.0), cand("b", [3, 3], 0.0)]},
        {"status": "unparseable", "candidates": [cand("a", [None, None], 1.0), cand("b", [None, None], 1.0)]},
    ]
    stats = round_stats(rows)
    assert stats["round/pairs"] == 2 and stats["round/ties"] == 1 and stats["round/unparseable"] == 1
    assert stats["round/judge_parse_failure_rate"] == pytest.approx(5 / 16)
    assert stats["round/pair_accuracy"] == 0.5
    assert stats["round/pair_verifier_gap"] == pytest.approx((1.0 - 0.5) / 2)
    assert stats["round/mean_response_length"] == pytest.approx(11 / 8)


def test_own_judging_examples_half_wrong_half_right_with_the_verifiers_verdicts():
    from rlhf.judge import own_judging_examples
    from rlhf.tasks import TaskConfig
    from rlhf.tasks.builtin import BuiltinTask

    task = BuiltinTask(TaskConfig(families=["arrange"]))
    p = "arrange: ABCD\n"
    rows = [{"prompt": p, "candidates": [{"response": "cadb", "verifier": 1.0}, {"response": "bdae", "verifier": 0.1875}, {"response": "bdac", "verifier": 1.0}]}]
    examples = own_judging_examples(task, rows, 4, random.Random(0), "judge {prompt}answer {response}\n")
    assert [e.response.endswith("score: 1") for e in examples] == [True, False, True, False]  # wrong first, then right
    assert examples[0] == task.judging_example(p, "bdae", "judge {prompt}answer {response}\n")
    assert examples[0].response == "bd+ da+ ae+ A+ B+ C- D+ =+\nscore: 1"
    only_right = [{"prompt": p, "candidates": [{"response": "cadb", "verifier": 1.0}]}]
    assert all(e.response.endswith("score: 5") for e in own_judging_examples(task, only_right, 3, random.Random(0), "{prompt}{response}"))
    with pytest.raises(ValueError, match="no candidate"):
        own_judging_examples(task, [], 2, random.Random(0), "{prompt}{response}")


def test_config_checks():
    with pytest.raises(ConfigError, match="judge_examples"):
        typed_stage_config("it1", {"kind": "self_reward_dpo", "judge_examples": "verifier"})
    with pytest.raises(ConfigError, match="num_candidates"):
        typed_stage_config("it1", {"kind": "self_reward_dpo", "num_candidates": 1})
    cfg = typed_stage_config("it1", {"kind": "self_reward_dpo"})
    assert (cfg.num_candidates, cfg.temperature, cfg.top_p, cfg.judge.num_samples) == (4, 0.7, 0.9, 3)
    assert cfg.nll_weight > 0  # the NLL term is on by default


# ------------------------------------------------------------------------- end to end

# A tiny model, a few prompts: the judge barely parses, so a wide regex (any digit in 6
# generated characters) makes sure some pairs exist to check.
def small(slots=("dpo_iter1", "dpo_iter2")) -> list[str]:
    return [
        "recipe=self_reward_eft",  # the default recipe and an EFT stage before the iterations
        "task=easy",
        "stages.sft.max_steps=30",
        "stages.sft.batch_size=16",
        "stages.sft.judge_fraction=0.5",
        *SMALL_EFT,
        *[f"stages.{slot}.{key}" for slot in slots for key in SMALL_ITER],
        *([f"stages.{slots[-1]}.judge_examples=own"] if len(slots) > 1 else []),  # the round's own candidates, judged by the verifier
    ]


SMALL_EFT = ("stages.eft.max_steps=3", "stages.eft.num_prompts=8", "stages.eft.batch_size=8")

SMALL_ITER = (
    "steps_per_round=2",
    "batch_size=4",
    "num_candidates=3",
    "judge.num_samples=2",
    "judge.score_regex='(\\d)'",
    "eval_prompts=4",
    "max_new_tokens=8",
    "judge_batch_size=4",  # keep the judge: judging examples' NLL every step
    "judge.temperature=1.0",  # the recipe's judge is greedy: sampled verdicts make the tiny model's scores differ
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_round_file(path: Path, prompts: int, k: int, j: int) -> list[dict]:
    rows = read_jsonl(path)
    assert [row["index"] for row in rows] == list(range(prompts))
    for row in rows:
        assert row["prompt"].endswith("\n") and len(row["candidates"]) == k
        for c in row["candidates"]:
            assert isinstance(c["response"], str)
            assert len(c["judgements"]) == j and all(isinstance(t, str) for t in c["judgements"])
            assert len(c["judge_scores"]) == j
            ok = [s for s in c["judge_scores"] if s is not None]
            assert c["score"] == (pytest.approx(sum(ok) / len(ok)) if ok else None)
            assert 0.0 <= c["verifier"] <= 1.0
        assert row["status"] in ("pair", "tie", "unparseable")
        if row["status"] == "pair":
            assert row["chosen"] != row["rejected"] and row["chosen_score"] > row["rejected_score"]
            assert len(row["ref"]) == 2 and all(v < 0 for v in row["ref"])
    return rows


@pytest.mark.slow
def test_self_reward_recipe_end_to_end_and_resume(cli, tmp_path):


    cli("run", *small(), *TINY, "stages.dpo_iter1.max_steps=4", "stages.dpo_iter2.max_steps=2", f"hydra.run.dir={tmp_path}")
    stages = tmp_path / "stages"
    assert sorted(p.name for p in stages.iterdir()) == ["00_sft", "01_eft", "02_dpo_iter1", "03_dpo_iter2"]
    # EFT sampled num_candidates answers to each of its prompts and kept the verifier's scores
    rows = read_jsonl(stages / "01_eft" / "candidates.jsonl")
    assert [row["index"] for row in rows] == list(range(8)) and all(len(row["candidates"]) == 4 for row in rows)
    assert all(0.0 <= c["verifier"] <= 1.0 for row in rows for c in row["candidates"])
    all_rows = []
    for name, rounds in (("02_dpo_iter1", 2), ("03_dpo_iter2", 1)):
        d = stages / name
        for f in ("COMPLETE", "policy.safetensors", "metrics.json", "samples.jsonl", "start_eval.json", "judge_eval_start.jsonl", "judge_eval_end.jsonl", "candidates.jsonl", "pairs.jsonl"):
            assert (d / f).exists(), f"{name}/{f} missing"
        assert not (d / "checkpoints").exists()
        files = sorted((d / "rounds").glob("round_*.jsonl"))
        assert [f.name for f in files] == [f"round_{r:03d}.jsonl" for r in range(rounds)]
        rows = [row for f in files for row in check_round_file(f, prompts=8, k=3, j=2)]
        all_rows += rows
        # the flat files hold the same candidates and pairs
        assert len(read_jsonl(d / "candidates.jsonl")) == 3 * len(rows)
        pairs = read_jsonl(d / "pairs.jsonl")
        assert [p["chosen"] for p in pairs] == [row["chosen"] for row in rows if row["status"] == "pair"]
        assert all(set(p) >= {"prompt", "chosen", "rejected"} for p in pairs)
        evals = read_jsonl(d / "judge_eval_end.jsonl")
        assert len(evals) == 4 * 3 and all(len(e["judgements"]) == 2 for e in evals)
        m = json.loads((d / "metrics.json").read_text())
        for key in (
            "eval/task_score", "eval/exact_match", "eval/response_length",  # the orchestrator's
            "eval/judge_parse_failure_rate", "eval/candidate_score", "eval/judge_pick_score", "eval/kl",
            "start/judge_parse_failure_rate", "pairs_total", "ties_total", "unparseable_total",
            "round/pairs", "round/ties", "round/unparseable", "round/judge_parse_failure_rate",
            "round/mean_response_length", "round/start_task_score", "round/generate_s", "train/judge_nll",
        ):
            assert key in m, key
        assert m["pairs_total"] + m["ties_total"] + m["unparseable_total"] == 8 * rounds
        assert m["pairs_total"] == sum(row["status"] == "pair" for row in rows)
    assert any(row["status"] == "pair" for row in all_rows)

    # resume: iteration 2 lost its end (no COMPLETE); its round file is reloaded, not regenerated
    d = stages / "03_dpo_iter2"
    (d / "COMPLETE").unlink()
    path = d / "rounds" / "round_000.jsonl"
    rows = read_jsonl(path)
    for row in rows:
        for c in row["candidates"]:
            c["marker"] = True
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli("run", f"resume={tmp_path}")
    assert (d / "COMPLETE").exists()
    assert all(c.get("marker") for c in read_jsonl(d / "candidates.jsonl"))

    # the report reads the run
    proc = cli("report", str(tmp_path), "--no-plot")
    assert "dpo_iter2" in proc.stdout and "judge_fail" in proc.stdout


@pytest.mark.slow
def test_self_reward_under_ddp(cli, tmp_path):
    """Two CPU processes: each samples and judges half the prompts; the round file holds all of them."""


    cli(
        "run", *small(["dpo_iter1"]), *TINY, "trainer=ddp_cpu", "~stage@stages.dpo_iter2", "order=[sft,eft,dpo_iter1]",
        "stages.sft.max_steps=10", "stages.dpo_iter1.max_steps=2", f"hydra.run.dir={tmp_path}",
        timeout=400,
    )
    d = tmp_path / "stages" / "02_dpo_iter1"
    assert (d / "COMPLETE").exists()
    rows = check_round_file(d / "rounds" / "round_000.jsonl", prompts=8, k=3, j=2)
    m = json.loads((d / "metrics.json").read_text())
    assert m["pairs_total"] == sum(row["status"] == "pair" for row in rows)


def test_eft_config_checks():
    with pytest.raises(ConfigError, match="answer_fraction"):
        typed_stage_config("eft", {"kind": "eft", "answer_fraction": 1.0})
    with pytest.raises(ConfigError, match="num_prompts"):
        typed_stage_config("eft", {"kind": "eft", "num_prompts": 0})


def test_no_pair_cause_blames_the_judge_with_a_raw_judgement_or_the_ties():
    def cand(scores, texts):
        return {"response": "ab", "judge_scores": scores, "judgements": texts}

    unparsed = [{"status": "unparseable", "candidates": [cand([None], ["Score: great"]), cand([None], ["fine"])]}]
    cause = no_pair_cause(unparsed)
    assert "did not parse (2 of 2" in cause and "'Score: great'" in cause
    tied = [{"status": "tie", "candidates": [cand([3.0], ["3"]), cand([3.0], ["3"])]}]
    assert "candidates of 1 of 1 prompts tied" in no_pair_cause(tied)


@pytest.mark.slow
def test_a_stage_whose_judge_never_parses_fails_and_is_not_complete(cli_in_process, tmp_path):
    proc = cli_in_process(
        "run", "recipe=self_reward", "task=easy", *TINY, "order=[sft,dpo_iter1]", "stages.sft.max_steps=2",
        *[f"stages.dpo_iter1.{key}" for key in SMALL_ITER if not key.startswith("judge.score_regex")],
        "stages.dpo_iter1.judge.score_regex='(Z{9})'", "stages.dpo_iter1.max_steps=2", f"hydra.run.dir={tmp_path}", check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "stages.dpo_iter1: no usable pair" in last and "did not parse" in last, last
    assert not (tmp_path / "stages" / "01_dpo_iter1" / "COMPLETE").exists()
    assert (tmp_path / "stages" / "01_dpo_iter1" / "rounds" / "round_000.jsonl").exists()  # kept, to look at
