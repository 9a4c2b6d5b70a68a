"""External-reward DPO: pair building, round files, a frozen reference, mid-round resume,
and tiny end-to-end CLI runs (the recipe, 2-process DDP)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlhf.config import typed_run_config, typed_stage_config
from rlhf.errors import DataError
from rlhf.models import build_model
from rlhf.stage_context import StageContext
from rlhf.stages import external_reward_dpo as erdpo
from rlhf.stages import stage_kinds
from rlhf.tasks import build_task
from rlhf.training import mix_seed

REPO = Path(__file__).resolve().parents[1]
TINY = {"dim": 32, "depth": 2, "heads": 2, "max_seq_len": 64, "tie_embedding": True}
EASY = {"sort_min_len": 3, "sort_max_len": 5, "add_min_digits": 1, "add_max_digits": 2}
# an untrained model earns 0 from the verifier almost always (all ties); length varies
LENGTH_REWARD = f"{__name__}.length_reward"
SMALL = {"batch_size": 4, "steps_per_round": 2, "num_candidates": 3, "max_new_tokens": 8, "eval_prompts": 0, "reward_fn": LENGTH_REWARD}


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) for r in responses]


def constant_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.5] * len(responses)


def make_ctx(stage_dir: Path, initial: dict | None = None, **stage) -> StageContext:
    cfg = typed_run_config(
        OmegaConf.create(
            {
                "order": ["s"],
                "stages": {"s": {"kind": "external_reward_dpo", **stage}},
                "model": TINY,
                "task": EASY,
                "logger": {"kind": "none"},
                "trainer": {"accelerator": "cpu", "progress_bar": False},
                "eval": {"num_prompts": 8},
            }
        )
    )
    task = build_task(cfg.task, stage_dir)
    torch.manual_seed(0)
    policy = build_model(cfg.model, task.tokenizer.vocab_size)
    if initial is not None:
        policy.load_state_dict(initial)
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(
        slot="s", cfg=typed_stage_config("s", cfg.stages.s), run_cfg=cfg, stage_dir=stage_dir, policy=policy,
        task=task, tokenizer=task.tokenizer, seed=mix_seed(0, "s"), logger=None, completed={},
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- pair building


def test_best_vs_worst_pairs_the_extremes():
    row = erdpo.best_vs_worst("p", ["a", "b", "c"], [0.2, 0.9, 0.1])
    assert (row["status"], row["chosen"], row["rejected"]) == ("pair", "b", "c")
    assert (row["chosen_reward"], row["rejected_reward"]) == (0.9, 0.1)
    assert [c["reward"] for c in row["candidates"]] == [0.2, 0.9, 0.1]
    # equal best rewards: the first one is chosen
    assert erdpo.best_vs_worst("p", ["a", "b", "c"], [1.0, 1.0, 0.0])["chosen"] == "a"
    # a candidate cut off at the token limit is recorded as unfinished (trained without EOS)
    row = erdpo.best_vs_worst("p", ["a", "b", "c"], [0.2, 0.9, 0.1], finished=[True, True, False])
    assert row["chosen_finished"] and not row["rejected_finished"] and not row["candidates"][2]["finished"]


def test_ties_and_missing_scores_give_no_pair():
    tie = erdpo.best_vs_worst("p", ["a", "b", "c"], [0.5, 0.5, 0.5])
    assert (tie["status"], tie["chosen"], tie["rejected"]) == ("tie", None, None)
    assert erdpo.best_vs_worst("p", ["a", "b"], [0.5, 0.55], min_gap=0.1)["status"] == "tie"
    missing = erdpo.best_vs_worst("p", ["a", "b", "c"], [None, 0.3, float("nan")])
    assert missing["status"] == "missing" and [c["reward"] for c in missing["candidates"]] == [None, 0.3, None]
    # a missing score drops that candidate only
    partial = erdpo.best_vs_worst("p", ["a", "b", "c"], [None, 0.3, 0.7])
    assert (partial["status"], partial["chosen"], partial["rejected"]) == ("pair", "c", "b")
    # min_chosen: only a good enough best makes a pair (exact answers, with the verifier)
    assert erdpo.best_vs_worst("p", ["a", "b"], [0.9, 0.2], min_chosen=1.0)["status"] == "low"
    assert erdpo.best_vs_worst("p", ["a", "b"], [1.0, 0.2], min_chosen=1.0)["status"] == "pair"


def test_round_stats_count_pairs_ties_and_missing():
    rows = [
        erdpo.best_vs_worst("p", ["a", "b"], [1.0, 0.0]),
        erdpo.best_vs_worst("p", ["a", "b"], [0.5, 0.5]),
        erdpo.best_vs_worst("p", ["a", "b"], [None, 0.0]),
        erdpo.best_vs_worst("p", ["a", "b"], [0.5, 0.0], min_chosen=1.0),
    ]
    stats = erdpo.round_stats(rows)
    assert [stats[f"round/{k}"] for k in ("pairs", "ties", "missing", "low")] == [1.0, 1.0, 1.0, 1.0]
    assert stats["round/mean_reward"] == pytest.approx(2.5 / 7)  # 1 + 0 + 0.5 + 0.5 + 0 + 0.5 + 0 over 7 scores
    assert stats["round/best_of_n_reward"] == pytest.approx(2.0 / 3)  # missing rows have no best


# ------------------------------------------------------------------------- the stage in-process


def test_rounds_are_saved_and_the_reference_stays_frozen(tmp_path, monkeypatch):
    refs = []
    real = erdpo.starting_reference
    monkeypatch.setattr(erdpo, "starting_reference", lambda ctx: refs.append(real(ctx)) or refs[-1])
    ctx = make_ctx(tmp_path, max_steps=4, lr=1e-2, refresh_reference=False, **SMALL)
    before = snapshot(ctx.policy)
    metrics = erdpo.run(ctx).metrics
    (ref,) = refs
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())  # bit-identical
    assert any(not torch.equal(v, before[k]) for k, v in ctx.policy.state_dict().items())
    files = sorted((tmp_path / "rounds").glob("round_*.jsonl"))
    assert [f.name for f in files] == ["round_000.jsonl", "round_001.jsonl"]
    for f in files:
        rows = read_rows(f)
        assert [r["index"] for r in rows] == list(range(8))  # batch_size * steps_per_round prompts
        for r in rows:
            assert len(r["candidates"]) == 3 and all(c["reward"] == len(c["response"]) for c in r["candidates"])
            if r["status"] == "pair":
                assert r["chosen_reward"] > r["rejected_reward"] and len(r["ref"]) == 2
    all_rows = [r for f in files for r in read_rows(f)]
    assert metrics["rounds/pairs"] == sum(r["status"] == "pair" for r in all_rows) > 0
    assert metrics["rounds/pairs"] + metrics["rounds/ties"] + metrics["rounds/missing"] + metrics["rounds/low"] == 16
    for key in ("train/loss", "train/rewards/accuracy", "train/logps/chosen", "round/mean_reward"):
        assert math.isfinite(metrics[key]), key


def test_resume_mid_round_reloads_the_round_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    flat = {"lr": 1e-2, "warmup_steps": 1, "min_lr_ratio": 1.0, **SMALL}  # constant lr: resume is exact
    initial = snapshot(make_ctx(tmp_path / "init").policy)
    straight = make_ctx(tmp_path / "a", initial=initial, max_steps=4, **flat)
    erdpo.run(straight)
    erdpo.run(make_ctx(tmp_path / "b", initial=initial, max_steps=3, **flat))  # stops mid round 1
    calls = []
    real = erdpo.generate_responses
    monkeypatch.setattr(erdpo, "generate_responses", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = make_ctx(tmp_path / "b", initial=initial, max_steps=4, **flat)
    erdpo.run(resumed)
    assert calls == []  # round 1 came from its file, not from the mid-round weights
    assert read_rows(tmp_path / "a" / "rounds" / "round_001.jsonl") == read_rows(tmp_path / "b" / "rounds" / "round_001.jsonl")
    a, b = snapshot(straight.policy), snapshot(resumed.policy)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_stage_of_only_ties_trains_nothing_and_fails_naming_the_cause(tmp_path):
    # a constant reward: every round ties. Its steps run with a zero loss (ranks stay in step),
    # then the stage fails instead of being marked complete
    stage = {**SMALL, "reward_fn": f"{__name__}.constant_reward", "loss": "hinge", "max_steps": 2}
    with pytest.raises(DataError, match=r"stages.s: no usable pair in any round.*8 prompts tied.*rewards: \[0.5, 0.5, 0.5\]"):
        erdpo.run(make_ctx(tmp_path, **stage))
    assert len(read_rows(tmp_path / "rounds" / "round_000.jsonl")) == 8  # the round is kept, to look at


# ---------------------------------------------------------------------------- CLI, end to end


def cli(run_dir: Path, *overrides: str, timeout: int = 300) -> None:
    cmd = [sys.executable, "-m", "rlhf", "run", "model=tiny", "task=easy", "logger=none", "eval.num_prompts=8",
           "trainer.progress_bar=false", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


TINY_ERDPO = ["stages.erdpo.max_steps=4", "stages.erdpo.steps_per_round=2", "stages.erdpo.batch_size=4",
              "stages.erdpo.max_new_tokens=8", "stages.erdpo.eval_prompts=8"]


@pytest.mark.slow
@pytest.mark.skipif("reward_model" not in stage_kinds(), reason="the reward_model stage is not in this tree")
def test_cli_external_reward_recipe_with_a_reward_model(tmp_path):
    cli(tmp_path, "recipe=external_reward", "stages.sft.max_steps=4", "stages.rm.max_steps=4", "stages.rm.batch_size=4", "stages.erdpo.min_reward_gap=0",
        "stages.rm.policy_samples=0", *TINY_ERDPO)
    stage = tmp_path / "stages" / "02_erdpo"
    assert (stage / "COMPLETE").exists()
    metrics = json.loads((stage / "metrics.json").read_text())
    assert "eval/task_score" in metrics and "round/mean_reward" in metrics
    rows = read_rows(stage / "rounds" / "round_001.jsonl")
    assert all(c["reward"] is not None for r in rows for c in r["candidates"])  # scored by the reward model


@pytest.mark.slow
def test_cli_verifier_reward_under_two_process_ddp(tmp_path):
    # the recipe without its reward model: the verifier (the default reward) scores instead
    cli(tmp_path, "recipe=external_reward", "~stage@stages.rm", "order=[sft,erdpo]", "stages.erdpo.reward_slot=null", "stages.erdpo.min_reward_gap=0",
        "trainer=ddp_cpu", "stages.sft.max_steps=2", *TINY_ERDPO)
    stage = tmp_path / "stages" / "01_erdpo"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["rounds/pairs"] + metrics["rounds/ties"] + metrics["rounds/missing"] == 16
    # both ranks sampled half of each round's prompts; rank 0 wrote the gathered rows in prompt order
    assert [r["index"] for r in read_rows(stage / "rounds" / "round_000.jsonl")] == list(range(8))
