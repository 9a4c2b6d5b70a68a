"""PPO: on-policy log-probs, learning, exact resume, the LoRA reference, end-to-end and DDP runs."""

import json

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from rlhf.config import RunConfig, typed_run_config, typed_stage_config
from rlhf.models import build_model, finish_trainable, prepare_trainable
from rlhf.rollout import eval_mode, policy_logprobs, rollout_generator, sample_rollout
from rlhf.stage_context import StageContext
from rlhf.stages import ppo
from rlhf.tasks import build_task

from conftest import TINY


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digit_reward(prompts, responses):
    """A reward a tiny random model can learn in a few rollouts: the share of digits in the response."""
    return [sum(c.isdigit() for c in r) / max(1, len(r)) for r in responses]


DIGITS = f"{__name__}.digit_reward"


def scaled_digit_reward(prompts, responses):
    """digit_reward in other units (x 10 + 5), as a learned reward model's outputs sit far from 0."""
    return [10 * r + 5 for r in digit_reward(prompts, responses)]


def make_ctx(tmp_path, kind: str = "ppo", seed: int = 0, **stage) -> StageContext:
    cfg = OmegaConf.merge(
        OmegaConf.structured(RunConfig),
        {
            "order": ["rl"],
            "stages": {"rl": {"kind": kind, **stage}},
            "model": {"dim": 32, "depth": 2, "heads": 2, "max_seq_len": 128},
            "task": {"families": ["sort"], "sort_min_len": 3, "sort_max_len": 5, "num_eval_prompts": 8},
            "trainer": {"accelerator": "cpu", "progress_bar": False, "checkpoint_every": 1},
            "logger": {"kind": "none"},
        },
    )
    cfg = typed_run_config(cfg)
    stage_cfg = typed_stage_config("rl", cfg.stages.rl)
    task = build_task(cfg.task, tmp_path)
    torch.manual_seed(seed)
    policy = prepare_trainable(build_model(cfg.model, task.tokenizer.vocab_size), stage_cfg)
    return StageContext(slot="rl", cfg=stage_cfg, run_cfg=cfg, stage_dir=tmp_path / "stage", policy=policy, task=task,
                        tokenizer=task.tokenizer, seed=7, logger=None, completed={})


def history(ctx) -> list[dict]:
    return [json.loads(line) for line in (ctx.stage_dir / "rollout_metrics.jsonl").read_text().splitlines()]


SMALL = dict(reward_fn=DIGITS, rollout_batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=8, eval_every=0, lr=3e-3, critic_lr_scale=1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_a_scoring_pass(tmp_path, temperature):
    """The ratio's old log-probs come from a full forward; the sampler's (KV cache, left padding) must agree."""
    ctx = make_ctx(tmp_path)
    prompts = ["sort: abc\n", "sort: zyxwv\n", "sort: q\n", "sort: mmmm\n"]  # different lengths: padding on both sides
    ro = sample_rollout(ctx.policy, ctx.tokenizer, prompts, digit_reward, max_new_tokens=10, temperature=temperature,
                        generator=rollout_generator(0, 0, 0, "cpu"))
    with eval_mode(ctx.policy):
        recomputed = policy_logprobs(ctx.policy(ro.tokens), ro.tokens, ro.response_mask, temperature)
    mask = ro.logprob_mask
    assert mask.sum() > 0 and torch.all(ro.sampled_logprobs[mask == 0] == 0)
    torch.testing.assert_close(ro.sampled_logprobs * mask, recomputed * mask, rtol=0, atol=1e-5)
    # each response token's log-prob sits at the position that predicts it
    assert torch.equal(ro.response_mask[:, 1:].float(), mask)


def test_a_filtered_sampler_is_caught(tmp_path):
    """Sampling at one temperature and training on another is off-policy: the stage refuses."""
    from rlhf.errors import TrainingError
    from rlhf.rollout import check_sampled_logprobs

    ctx = make_ctx(tmp_path)
    ro = sample_rollout(ctx.policy, ctx.tokenizer, ["sort: abc\n"] * 4, digit_reward, max_new_tokens=8, temperature=0.5,
                        generator=rollout_generator(0, 0, 0, "cpu"))
    with eval_mode(ctx.policy):
        recomputed = policy_logprobs(ctx.policy(ro.tokens), ro.tokens, ro.response_mask, 1.0)
    with pytest.raises(TrainingError, match="on-policy"):
        check_sampled_logprobs(ro.sampled_logprobs, recomputed, ro.logprob_mask, 0.05, "rl")


def test_ppo_learns_and_reports(tmp_path):
    ctx = make_ctx(tmp_path, max_steps=12, **SMALL)
    result = ppo.run(ctx)
    rows = history(ctx)
    assert [r["rollout"] for r in rows] == list(range(12))
    first, last = sum(r["rollout/reward_mean"] for r in rows[:3]) / 3, sum(r["rollout/reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.05, (first, last)
    for r in rows:
        assert r["rollout/logprob_mismatch"] < 1e-4
        assert 0 <= r["train/clip_fraction"] <= 1
    assert rows[-1]["rollout/kl"] > 0  # moved away from the reference, and measured
    assert {"rollout/entropy", "train/value_loss", "train/explained_variance", "rollout/response_length"} <= set(rows[-1])
    assert result.metrics["rollout/reward_mean"] == rows[-1]["rollout/reward_mean"]
    assert not (ctx.stage_dir / "rollout_buffer").exists() or not any((ctx.stage_dir / "rollout_buffer").rglob("*.npy"))


def test_normalized_rewards_make_the_update_independent_of_the_reward_units(tmp_path):
    """normalize_rewards whitens each rollout's sequence rewards: a reward in other units (x 10 + 5)
    gives the same update; without it, the same two rewards train differently."""
    stage = dict(SMALL, max_steps=1, normalize_rewards=True)
    plain = make_ctx(tmp_path / "plain", **stage)
    scaled = make_ctx(tmp_path / "scaled", **dict(stage, reward_fn=f"{__name__}.scaled_digit_reward"))
    ppo.run(plain)
    ppo.run(scaled)
    assert history(scaled)[0]["rollout/reward_mean"] != pytest.approx(history(plain)[0]["rollout/reward_mean"])  # logged raw
    for (name, p), q in zip(plain.policy.named_parameters(), scaled.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)
    raw = make_ctx(tmp_path / "raw", **dict(stage, normalize_rewards=False, reward_fn=f"{__name__}.scaled_digit_reward"))
    ppo.run(raw)
    assert any(not torch.allclose(p, q, atol=1e-5) for p, q in zip(plain.policy.parameters(), raw.policy.parameters()))


class Crash(L.Callback):
    def __init__(self, after: int):
        self.after = after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch["step"] == self.after:
            raise KeyboardInterrupt  # after the checkpoint callback has saved this rollout


def test_resume_after_a_crash_is_exact(tmp_path, monkeypatch):
    """One Lightning step = one rollout + its PPO epochs: a checkpoint between rollouts resumes bit-exactly."""
    stage = dict(SMALL, max_steps=4, kl_target=0.05, ptx_coef=0.1, ptx_batch_size=4)
    straight = make_ctx(tmp_path / "a", **stage)
    ppo.run(straight)

    crashed = make_ctx(tmp_path / "b", **stage)
    fit = StageContext.fit
    monkeypatch.setattr(StageContext, "fit", lambda self, m, mb, callbacks=None: fit(self, m, mb, [Crash(after=1)]))
    with pytest.raises(BaseException):
        ppo.run(crashed)
    monkeypatch.setattr(StageContext, "fit", fit)
    assert (crashed.stage_dir / "checkpoints" / "last.ckpt").exists()
    resumed = make_ctx(tmp_path / "b", **stage)  # a fresh process: same starting weights, state from the checkpoint
    ppo.run(resumed)

    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b), name
    assert history(straight) == history(resumed)  # KL controller, metrics and data replayed exactly


def test_lora_ppo_keeps_the_reference_at_the_starting_weights(tmp_path):
    pytest.importorskip("peft")
    from rlhf.models import disabled_adapters, has_lora

    ctx = make_ctx(tmp_path, max_steps=3, lora={"enabled": True, "rank": 4}, **SMALL)
    assert has_lora(ctx.policy)
    start = build_model(ctx.run_cfg.model, ctx.tokenizer.vocab_size)
    torch.manual_seed(0)
    start = build_model(ctx.run_cfg.model, ctx.tokenizer.vocab_size)  # same seed: the starting weights
    x = torch.randint(2, ctx.tokenizer.vocab_size, (3, 12))
    ppo.run(ctx)
    assert history(ctx)[-1]["rollout/kl"] != 0
    with eval_mode(ctx.policy), disabled_adapters(ctx.policy):
        torch.testing.assert_close(ctx.policy(x), start.eval()(x), rtol=0, atol=0)
    merged = finish_trainable(ctx.policy, ctx.cfg, ctx.stage_dir, True)
    assert not has_lora(merged) and (ctx.stage_dir / "lora_adapter.safetensors").exists()


def test_separate_critic_memmap_k3_adaptive_kl(tmp_path):
    ctx = make_ctx(tmp_path, max_steps=2, critic="separate", critic_train_last_n_layers=1, buffer="memmap",
                   kl_estimator="k3", kl_target=0.1, ent_coef=0.01, **SMALL)
    ppo.run(ctx)
    rows = history(ctx)
    assert rows[0]["rollout/kl_coef"] == 0.05 and rows[1]["rollout/kl_coef"] != 0.05  # the controller moved
    assert (ctx.stage_dir / "rollout_buffer" / "rank0").exists() is False or not any((ctx.stage_dir / "rollout_buffer").rglob("*.npy"))


def test_micro_batches_add_up_to_the_minibatch(tmp_path):
    """micro_batch_size trades speed for memory without changing the update (token-weighted parts)."""
    stage = dict(SMALL, max_steps=1, ppo_epochs=1, minibatch_size=8, lr=1e-4)
    whole, split = make_ctx(tmp_path / "whole", **stage), make_ctx(tmp_path / "split", micro_batch_size=2, **stage)
    ppo.run(whole)
    ppo.run(split)
    a, b = history(whole)[0], history(split)[0]
    for key in ("train/policy_loss", "train/value_loss", "rollout/entropy", "train/clip_fraction"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    # AdamW's first step is about lr * sign(grad): a gradient entry near zero turns the summation
    # order's rounding into up to ~1% of lr (1.05e-6 at lr 1e-4 on an AVX-512 CPU); 5% is the bound
    for (name, p), q in zip(whole.policy.named_parameters(), split.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0.05 * stage["lr"], msg=name)


def test_bad_settings_fail_before_training(tmp_path):
    from rlhf.errors import ConfigError

    for bad, match in ((dict(critic="both"), "critic"), (dict(kl_estimator="k9"), "kl_estimator"),
                       (dict(rollout_batch_size=10, minibatch_size=4), "multiple"), (dict(micro_batch_size=3), "micro_batch_size"),
                       (dict(reward_slot="rm"), "rm")):
        with pytest.raises(ConfigError, match=match):
            ppo.run(make_ctx(tmp_path, **bad))


@pytest.mark.slow
def test_ppo_recipe_end_to_end(cli, tmp_path):
    """SFT -> reward model -> PPO on the learned reward, with the verifier logged beside it."""
    run = tmp_path / "run"
    cli("run", "recipe=ppo", *TINY, "stages.sft.max_steps=3", "stages.rm.max_steps=3", "stages.rm.batch_size=4",
        "stages.ppo.max_steps=2", "stages.ppo.rollout_batch_size=8", "stages.ppo.minibatch_size=4", "stages.ppo.max_new_tokens=8",
        "stages.ppo.eval_every=2", "stages.ppo.eval_num_prompts=4", f"hydra.run.dir={run}")
    stage = run / "stages" / "02_ppo"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert (stage / "COMPLETE").exists()
    assert {"eval/task_score", "rollout/reward_mean", "rollout/verifier_score", "rollout/kl"} <= set(metrics)
    rows = [json.loads(line) for line in (stage / "rollout_metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "eval/task_score" in rows[1]


@pytest.mark.slow
def test_ppo_under_two_process_ddp(cli, tmp_path):
    run = tmp_path / "run"
    cli("run", "recipe=ppo", "~stage@stages.rm", "order=[sft,ppo]", "stages.ppo.reward_slot=null", *TINY, "trainer=ddp_cpu",
        "stages.sft.max_steps=2", "stages.ppo.max_steps=2", "stages.ppo.rollout_batch_size=8", "stages.ppo.minibatch_size=4",
        "stages.ppo.max_new_tokens=8", "stages.ppo.eval_every=0", f"hydra.run.dir={run}")
    stage = run / "stages" / "01_ppo"
    assert (stage / "COMPLETE").exists()
    rows = [json.loads(line) for line in (stage / "rollout_metrics.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in rows] == [0, 1]
