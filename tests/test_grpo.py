"""GRPO / Dr. GRPO / RLOO: group-relative advantages learn, end-to-end and DDP runs."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from rlhf.config import RunConfig, typed_run_config, typed_stage_config
from rlhf.models import build_model, prepare_trainable
from rlhf.stage_context import StageContext
from rlhf.stages import grpo
from rlhf.tasks import build_task

from conftest import TINY


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digit_reward(prompts, responses):
    """The share of digits in the response: learnable by a tiny random model in a few rollouts."""
    return [sum(c.isdigit() for c in r) / max(1, len(r)) for r in responses]


DIGITS = f"{__name__}.digit_reward"
SMALL = dict(reward_fn=DIGITS, rollout_batch_size=4, group_size=4, max_new_tokens=8, eval_every=0, lr=3e-3)


def make_ctx(tmp_path, **stage) -> StageContext:
    cfg = OmegaConf.merge(
        OmegaConf.structured(RunConfig),
        {
            "order": ["rl"],
            "stages": {"rl": {"kind": "grpo", **stage}},
            "model": {"dim": 32, "depth": 2, "heads": 2, "max_seq_len": 128},
            "task": {"families": ["sort"], "sort_min_len": 3, "sort_max_len": 5, "num_eval_prompts": 8},
            "trainer": {"accelerator": "cpu", "progress_bar": False},
            "logger": {"kind": "none"},
        },
    )
    cfg = typed_run_config(cfg)
    stage_cfg = typed_stage_config("rl", cfg.stages.rl)
    task = build_task(cfg.task, tmp_path)
    torch.manual_seed(0)
    policy = prepare_trainable(build_model(cfg.model, task.tokenizer.vocab_size), stage_cfg)
    return StageContext(slot="rl", cfg=stage_cfg, run_cfg=cfg, stage_dir=tmp_path / "stage", policy=policy, task=task,
                        tokenizer=task.tokenizer, seed=3, logger=None, completed={})


def history(ctx) -> list[dict]:
    return [json.loads(line) for line in (ctx.stage_dir / "rollout_metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_grpo_learns_a_simple_reward(tmp_path, advantage):
    ctx = make_ctx(tmp_path, max_steps=12, advantage=advantage, minibatch_size=8, ppo_epochs=2, **SMALL)
    result = grpo.run(ctx)
    rows = history(ctx)
    first, last = sum(r["rollout/reward_mean"] for r in rows[:3]) / 3, sum(r["rollout/reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.05, (first, last)
    assert all(r["rollout/logprob_mismatch"] < 1e-4 for r in rows)
    assert rows[-1]["rollout/kl"] > 0  # measured against the reference even with kl_coef 0
    assert result.metrics["rollout/reward_mean"] == rows[-1]["rollout/reward_mean"]


def test_dr_grpo_with_kl_penalty_memmap_and_lora(tmp_path):
    pytest.importorskip("peft")
    ctx = make_ctx(tmp_path, max_steps=2, advantage="dr_grpo", kl_coef=0.1, buffer="memmap", lora={"enabled": True, "rank": 2}, **SMALL)
    grpo.run(ctx)
    rows = history(ctx)
    assert len(rows) == 2 and "train/kl_k3" in rows[-1]
    assert not any((ctx.stage_dir / "rollout_buffer").rglob("*.npy"))  # each rollout's files are removed after its updates


def test_gspo_sequence_ratio_with_clip_higher_runs_several_updates(tmp_path):
    # GSPO's sequence-level ratio and DAPO's clip-higher, with 2 epochs of 2 minibatches (ratios != 1)
    ctx = make_ctx(tmp_path, max_steps=2, ratio_level="sequence", clip_eps_high=0.28, minibatch_size=8, ppo_epochs=2, **SMALL)
    grpo.run(ctx)
    rows = history(ctx)
    assert len(rows) == 2 and all(0.0 <= r["train/clip_fraction"] <= 1.0 for r in rows)


@pytest.mark.parametrize("loss_type", [None, "dapo"])
def test_micro_batches_add_up_to_the_minibatch(tmp_path, loss_type):
    # rows weigh a sequence-mean loss, tokens a token-level (dapo) one
    stage = dict(SMALL, max_steps=1, lr=1e-4, loss_type=loss_type)  # small steps: Adam turns float noise in near-zero gradients into lr-sized steps
    whole, split = make_ctx(tmp_path / "whole", **stage), make_ctx(tmp_path / "split", micro_batch_size=4, **stage)
    grpo.run(whole)
    grpo.run(split)
    a, b = history(whole)[0], history(split)[0]
    for key in ("train/loss", "rollout/entropy", "rollout/logprob_mismatch"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for (name, p), q in zip(whole.policy.named_parameters(), split.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0.05 * stage["lr"], msg=name)  # 5% of one Adam step


def test_one_update_per_rollout_by_default(tmp_path):
    ctx = make_ctx(tmp_path, max_steps=1, **SMALL)
    module = grpo.GRPOModule(ctx, None, use_reference=False)
    assert module.optimizer_steps_per_batch == 1
    ctx = make_ctx(tmp_path, max_steps=1, minibatch_size=4, ppo_epochs=3, **SMALL)
    assert grpo.GRPOModule(ctx, None, use_reference=False).optimizer_steps_per_batch == 3 * 16 // 4


def test_bad_settings_fail_before_training(tmp_path):
    from rlhf.errors import ConfigError

    for bad, match in ((dict(advantage="ppo"), "advantage"), (dict(group_size=1), "group_size"), (dict(minibatch_size=5), "multiple"),
                       (dict(micro_batch_size=3), "micro_batch_size"), (dict(ratio_level="sentence"), "ratio_level"),
                       (dict(clip_eps_high=-0.1), "clip_eps_high"), (dict(loss_type="bnpo"), "loss_type"),
                       (dict(loss_type="dapo", ratio_level="sequence"), "choose one")):
        with pytest.raises(ConfigError, match=match):
            grpo.run(make_ctx(tmp_path, **{**SMALL, **bad}))


@pytest.mark.slow
def test_grpo_recipe_end_to_end(cli, tmp_path):
    run = tmp_path / "run"
    cli("run", "recipe=grpo", *TINY, "stages.sft.max_steps=3", "stages.grpo.max_steps=2", "stages.grpo.rollout_batch_size=2",
        "stages.grpo.group_size=4", "stages.grpo.max_new_tokens=8", "stages.grpo.eval_every=2", "stages.grpo.eval_num_prompts=4",
        "stages.grpo.advantage=rloo", f"hydra.run.dir={run}")
    stage = run / "stages" / "01_grpo"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert (stage / "COMPLETE").exists() and not (stage / "checkpoints").exists()
    assert {"eval/task_score", "rollout/reward_mean", "rollout/kl"} <= set(metrics)


@pytest.mark.slow
def test_grpo_under_two_process_ddp(cli, tmp_path):
    run = tmp_path / "run"
    cli("run", "recipe=grpo", *TINY, "trainer=ddp_cpu", "stages.sft.max_steps=2", "stages.grpo.max_steps=2",
        "stages.grpo.rollout_batch_size=2", "stages.grpo.group_size=4", "stages.grpo.max_new_tokens=8", "stages.grpo.eval_every=0",
        "stages.grpo.buffer=memmap", f"hydra.run.dir={run}")
    stage = run / "stages" / "01_grpo"
    assert (stage / "COMPLETE").exists()
    rows = [json.loads(line) for line in (stage / "rollout_metrics.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in rows] == [0, 1]
