"""PPO, the classic RLHF recipe (Ziegler et al. 2019; InstructGPT).

Actor: the policy. Critic (`critic`): "shared" = a linear value head on the policy's own
trunk (one forward gives logits and values), or "separate" = a copy of the trunk plus a
head, trained beside the actor. Reference: the stage's starting weights, frozen
(`frozen_copy`), or with LoRA on, the same model with its adapters switched off (no
second copy of the weights). Reward: an earlier reward_model slot (`reward_slot`) or a
function (`reward_fn`, the built-in task's verifier by default), given at the last
response token; a per-token KL penalty to the reference (`kl_estimator` k1|k3, fixed
`kl_coef`, or adaptive towards `kl_target`) is added at every token.

One training step = one rollout: `rollout_batch_size` prompts sampled (batched, KV cache,
temperature 1 and no top-k/top-p by default, so the ratio's log-probs are the policy's),
scored, old log-probs / values / reference log-probs recomputed in eval mode (see
rlhf/rollout.py for why), GAE(gamma, lambda) advantages whitened over the rollout, then
`ppo_epochs` passes of clipped-surrogate + clipped-value (+ entropy bonus, + PPO-ptx)
updates over `minibatch_size` minibatches. Lightning runs it with manual optimization and
`optimizer_steps_per_batch` (rlhf/training.py), so `max_steps` counts rollouts and a
checkpoint is only ever taken between rollouts; the rollout for step s is sampled with a
generator seeded by (seed, s, rank), so a resumed run replays exactly. The KL
controller's state and the metric history travel in the checkpoint.

Per rollout it logs reward mean/std, KL to the reference, entropy, clip fraction, value
loss, explained variance and response length (also in <stage dir>/rollout_metrics.jsonl),
`eval/task_score` every `eval_every` rollouts, a table of sample rollouts, and with a
learned reward the verifier's score of the same rollouts (`rollout/verifier_score`).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import lightning as L
import torch
from torch import nn

from rlhf.config import StageConfig
from rlhf.errors import ConfigError
from rlhf.logprobs import response_nll
from rlhf.losses.policy_gradient import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf.models import apply_lora, base_state_dict, disabled_adapters, frozen_copy, gather_policy, has_lora, shard_in, train_last_n_layers
from rlhf.rollout import (
    MaskedMoments,
    check_sampled_logprobs,
    chunks,
    eval_mode,
    log_samples,
    make_buffer,
    mean_over_ranks,
    mid_training_eval,
    minibatch_generator,
    minibatches,
    per_rank,
    policy_logprobs,
    rollout_generator,
    rollout_prompts,
    sample_rollout,
    stage_reward,
    trim,
    write_history,
)
from rlhf.sampling import encode_examples, encode_prompt
from rlhf.stage_context import StageContext, StageResult
from rlhf.training import adamw_with_schedule, check_finite, mix_seed

KIND = "ppo"


@dataclass
class Config(StageConfig):
    kind: str = KIND
    max_steps: int = 100  # rollouts
    lr: float = 2e-5  # measured: 1e-4 drifts far from the reference within a few rollouts (docs/results_rl.md)
    warmup_steps: int = 0  # in rollouts; the schedule steps once per rollout
    min_lr_ratio: float = 1.0  # constant learning rate
    rollout_batch_size: int = 64  # prompts per rollout (all processes together)
    minibatch_size: int = 16  # rows per update (all processes together)
    micro_batch_size: Optional[int] = None  # rows per forward/backward inside a minibatch (less memory); None = all
    ppo_epochs: int = 2
    generation_batch_size: int = 64  # rows per generate() call on one process
    max_new_tokens: int = 24
    temperature: float = 1.0  # sampling AND the trained distribution: logits / temperature
    reward_fn: Optional[str] = "rlhf.tasks.builtin.verifier_reward"
    reward_slot: Optional[str] = None  # an earlier reward_model slot; replaces reward_fn when set
    critic: str = "shared"  # shared | separate
    critic_train_last_n_layers: Optional[int] = None  # separate critic only
    vf_coef: float = 0.1
    critic_lr_scale: float = 10.0  # the value head (and a separate critic) learn at lr x this: they start from scratch
    clip_eps: float = 0.2  # policy ratio clipped to [1 - eps, 1 + eps]
    value_clip_eps: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # initial value when kl_target is set
    kl_target: Optional[float] = None  # adaptive KL controller towards this per-sequence KL
    kl_horizon: int = 10000
    kl_estimator: str = "k1"  # k1 | k3 (per-token penalty)
    ent_coef: float = 0.0  # entropy bonus
    whiten_advantages: bool = True
    # whiten each generation chunk's sequence rewards, (r - mean) / std, before the KL penalty:
    # a learned reward model's outputs sit near 5 here, where a value head starting at 0 (lr
    # 2e-4, values clipped to +-0.2 per update) never caught up (explained variance 0.02) and
    # its loss dragged the shared trunk (entropy 0.25 -> 0.5). OpenRLHF's normalize_reward
    # uses the reward model's running moments instead; TRL's whiten_rewards keeps the mean
    normalize_rewards: bool = False
    ptx_coef: float = 0.0  # PPO-ptx: weight of the SFT loss on the task's solved examples
    ptx_batch_size: int = 16
    buffer: str = "memory"  # memory | memmap (numpy files in the stage dir)
    eval_every: int = 10  # rollouts between held-out evaluations (0: never)
    eval_num_prompts: int = 100
    num_logged_samples: int = 8
    logprob_tolerance: float = 0.05  # max mean |sampled - recomputed| log-prob per token


class PPOModule(L.LightningModule):
    def __init__(self, ctx: StageContext, critic: Optional[nn.Module], reference: Optional[nn.Module]):
        super().__init__()
        cfg = ctx.cfg
        self.automatic_optimization = False
        # one Lightning step = one rollout = ppo_epochs x (rollout / minibatch) optimizer steps
        self.optimizer_steps_per_batch = cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
        self.policy = ctx.policy
        self.critic = critic  # None: values come from the policy's trunk
        self.value_head = nn.Linear(ctx.policy.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self._reference = [reference]  # a list keeps it out of the state dict and the optimizer
        self.ctx, self.cfg = ctx, cfg
        if cfg.kl_target is not None:
            self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(cfg.kl_coef)
        self.history: list[dict] = []

    # -- setup ------------------------------------------------------------------------------
    def configure_optimizers(self):
        critic = list(self.value_head.parameters()) + (list(self.critic.parameters()) if self.critic is not None else [])
        groups = [{"params": list(self.policy.parameters())}, {"params": critic, "lr": self.cfg.lr * self.cfg.critic_lr_scale}]
        return adamw_with_schedule(groups, self.cfg)

    def configure_model(self):
        shard_in(self, self.policy, *([self.critic] if self.critic is not None else []))  # trainer.strategy=fsdp (rlhf/models/fsdp.py)
        # its own group: a parameter outside every group would keep each process's own gradient
        shard_in(self, self.value_head, whole_group=True)

    def on_fit_start(self):
        if self._reference[0] is not None:
            self._reference[0].to(self.device)
        self.reward_fn, self.verifier = stage_reward(self.ctx, self.cfg.reward_fn, self.cfg.reward_slot)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["ppo"] = {"kl_controller": self.kl_ctl.state_dict(), "history": self.history}

    def on_load_checkpoint(self, checkpoint):
        self.kl_ctl.load_state_dict(checkpoint["ppo"]["kl_controller"])
        self.history = checkpoint["ppo"]["history"]

    # -- forward passes ---------------------------------------------------------------------
    def logits_and_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits (B, W, V) and values (B, W - 1): value t is read at the position that predicts token t + 1."""
        if self.critic is None:
            logits, hidden = self.policy.forward_hidden(tokens)
        else:
            logits = self.policy(tokens)
            hidden = self.critic.hidden(tokens)
        return logits, self.value_head(hidden[:, :-1].to(self.value_head.weight.dtype)).squeeze(-1).float()

    def reference_logprobs(self, tokens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        if self._reference[0] is None:  # LoRA: the base weights are the reference
            with disabled_adapters(self.policy):
                logits = self.policy(tokens)
        else:
            logits = self._reference[0](tokens)
        return policy_logprobs(logits, tokens, response_mask, self.cfg.temperature)

    # -- one rollout ------------------------------------------------------------------------
    def collect(self, step: int, prompts: list[str]):
        """Sample, score and prepare one rollout into a buffer: (buffer, advantage moments, metrics, first chunk)."""
        cfg, ctx, tok = self.cfg, self.ctx, self.ctx.tokenizer
        width = max(len(encode_prompt(tok, p)) for p in prompts) + cfg.max_new_tokens
        fields = {"tokens": "tokens", "response_mask": "mask", "old_logprobs": "shifted", "old_values": "shifted", "advantages": "shifted", "returns": "shifted"}
        buffer = make_buffer(cfg.buffer, ctx.stage_dir, self.global_rank, len(prompts), width, fields)
        generator = rollout_generator(ctx.seed, step, self.global_rank, self.device)
        advantages, returns, residuals = MaskedMoments(), MaskedMoments(), MaskedMoments()
        parts = defaultdict(list)
        models = [self.policy] + ([self.critic] if self.critic is not None else [])
        # sharded: every rank gathers the whole weights once per rollout to sample with (a sharded
        # model would all-gather every layer at every decoding step, in lockstep)
        sampler = gather_policy(self.policy, ctx.new_policy)
        for start, stop in chunks(len(prompts), cfg.generation_batch_size):
            ro = sample_rollout(sampler, tok, prompts[start:stop], self.reward_fn, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=generator, verifier=self.verifier)
            with eval_mode(*models):
                logits, values = self.logits_and_values(ro.tokens)
                old_logprobs = policy_logprobs(logits, ro.tokens, ro.response_mask, cfg.temperature)
                ref_logprobs = self.reference_logprobs(ro.tokens, ro.response_mask)
            mask = ro.logprob_mask
            parts["mismatch"].append(check_sampled_logprobs(ro.sampled_logprobs, old_logprobs, mask, cfg.logprob_tolerance, ctx.slot))
            kl = kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
            rewards = -self.kl_ctl.value * kl
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
            seq_rewards = masked_whiten(ro.rewards, torch.ones_like(ro.rewards)) if cfg.normalize_rewards else ro.rewards
            rewards[torch.arange(len(last)), last] += seq_rewards
            adv, ret = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            advantages.add(adv, mask)
            returns.add(ret, mask)
            residuals.add(ret - values, mask)
            buffer.write(start, tokens=ro.tokens, response_mask=ro.response_mask, old_logprobs=old_logprobs, old_values=values, advantages=adv, returns=ret)
            parts["rewards"].append(ro.rewards)
            parts["kl"].append(((old_logprobs - ref_logprobs) * mask).sum(1))  # k1 per sequence: the reported KL
            parts["lengths"].append(ro.response_lengths)
            if ro.verifier is not None:
                parts["verifier"].append(ro.verifier)
            if start == 0:
                first = ro
        buffer.flush()
        rewards = self.all_gather(torch.cat(parts["rewards"])).flatten()
        metrics = {
            "rollout/reward_mean": float(rewards.mean()),
            "rollout/reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "rollout/kl": float(torch.cat(parts["kl"]).mean()),
            "rollout/kl_coef": self.kl_ctl.value,
            "rollout/response_length": float(torch.cat(parts["lengths"]).mean()),
            "rollout/logprob_mismatch": sum(parts["mismatch"]) / len(parts["mismatch"]),
            "train/explained_variance": float("nan") if returns.constant else 1.0 - residuals.var / returns.var,
        }
        if parts["verifier"]:
            metrics["rollout/verifier_score"] = float(torch.cat(parts["verifier"]).mean())
        return buffer, advantages, metrics, first

    def ptx_loss(self, step: int, update: int) -> torch.Tensor:
        """SFT loss on the task's solved examples, mixed back in (InstructGPT's PPO-ptx)."""
        tok = self.ctx.tokenizer
        rng = random.Random(mix_seed(self.ctx.seed, "ptx", step, update, self.global_rank))
        examples = [self.ctx.task.sft_example(rng) for _ in range(per_rank(self.cfg.ptx_batch_size, self.trainer.world_size, "ptx_batch_size"))]
        tokens, mask = encode_examples(tok, examples, self.device)
        return response_nll(self.policy(tokens), tokens, mask)

    def minibatch_loss(self, mb: dict[str, torch.Tensor], adv_moments: MaskedMoments) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The PPO loss over these rows (masked means over their response tokens) and its parts."""
        cfg = self.cfg
        tokens, mask = mb["tokens"], mb["response_mask"][:, 1:].float()
        adv = adv_moments.whiten(mb["advantages"], mask) if cfg.whiten_advantages else mb["advantages"]
        logits, values = self.logits_and_values(tokens)
        logprobs = policy_logprobs(logits, tokens, mb["response_mask"], cfg.temperature)
        pg_loss, clip_fraction, approx_kl = ppo_policy_loss(logprobs, mb["old_logprobs"], adv, mask, cfg.clip_eps)
        vf_loss = ppo_value_loss(values, mb["old_values"], mb["returns"], mask, cfg.value_clip_eps)
        scaled = logits[:, :-1].float() / cfg.temperature
        entropy = masked_mean(entropy_from_logits(scaled if cfg.ent_coef > 0 else scaled.detach()), mask)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
        parts = {"train/policy_loss": pg_loss, "train/value_loss": vf_loss, "train/clip_fraction": clip_fraction, "train/approx_kl": approx_kl, "rollout/entropy": entropy}
        return loss, parts

    def training_step(self, batch, batch_idx):
        cfg, step = self.cfg, batch["step"]
        buffer, adv_moments, metrics, first = self.collect(step, batch["prompts"])
        opt, sched = self.optimizers(), self.lr_schedulers()
        world = self.trainer.world_size
        rows, size = len(batch["prompts"]), per_rank(cfg.minibatch_size, world, "minibatch_size")
        micro = per_rank(cfg.micro_batch_size, world, "micro_batch_size") if cfg.micro_batch_size else size
        sums, updates = defaultdict(float), 0
        for epoch in range(cfg.ppo_epochs):
            for idx in minibatches(rows, size, minibatch_generator(self.ctx.seed, step, epoch, self.global_rank)):
                mb = buffer.read(idx)
                total = float(mb["response_mask"][:, 1:].sum().clamp(min=1))
                opt.zero_grad()
                for part in torch.arange(len(idx)).split(micro):
                    # micro-batches: token-weighted, so their gradients add up to the whole minibatch's exactly
                    chunk = trim({k: v[part].to(self.device) for k, v in mb.items()})
                    weight = float(chunk["response_mask"][:, 1:].sum()) / total
                    loss, parts = self.minibatch_loss(chunk, adv_moments)
                    loss = loss * weight
                    if cfg.ptx_coef > 0 and part[0] == 0:
                        ptx = self.ptx_loss(step, updates)
                        loss = loss + cfg.ptx_coef * ptx
                        sums["train/ptx_loss"] += float(ptx.detach())
                    check_finite(loss, self.ctx.slot, step)
                    self.manual_backward(loss)
                    for name, value in parts.items():
                        sums[name] += float(value.detach()) * weight
                if cfg.grad_clip:
                    self.clip_gradients(opt, gradient_clip_val=cfg.grad_clip, gradient_clip_algorithm="norm")
                opt.step()
                updates += 1
        sched.step()
        buffer.close()
        metrics.update({k: v / updates for k, v in sums.items()})
        metrics["train/lr"] = sched.get_last_lr()[0]
        metrics = mean_over_ranks(self, metrics)
        self.kl_ctl.update(metrics["rollout/kl"], cfg.rollout_batch_size)
        self.log("reward", metrics["rollout/reward_mean"], prog_bar=True, logger=False)
        row = {"rollout": step, **metrics}
        # sharded: rank 0 cannot sample alone (rlhf/models/fsdp.py); the end-of-stage evaluation runs
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and self.global_rank == 0 and self.device_mesh is None:
            row.update(mid_training_eval(self.policy, self.ctx.task, self.ctx.tokenizer, self.ctx.run_cfg, cfg.eval_num_prompts))
            log_samples(self.ctx.logger, step, first, cfg.num_logged_samples)
        if self.ctx.logger is not None and self.global_rank == 0:
            # every rollout, straight to the logger: Lightning's log_every_n_steps would drop most of them
            self.ctx.logger.log_metrics(metrics | {k: v for k, v in row.items() if k.startswith("eval/")}, step=step)
        self.history.append(row)
        if self.global_rank == 0 and "eval/response_length" in row:  # and at the end; not every rollout: the file grows
            write_history(self.ctx.stage_dir, self.history)

    def on_train_end(self):
        if self.global_rank == 0:
            write_history(self.ctx.stage_dir, self.history)


def check_config(cfg: Config, slot: str) -> None:
    """The checks that need no model, task or other stage; rlhf.config runs them when the run's
    config is read, so they fail before any stage trains."""
    if cfg.critic not in ("shared", "separate"):
        raise ConfigError(f"stages.{slot}.critic={cfg.critic!r} is not one of: shared, separate")
    if cfg.kl_estimator not in KL_KINDS:
        raise ConfigError(f"stages.{slot}.kl_estimator={cfg.kl_estimator!r} is not one of: {', '.join(KL_KINDS)}")
    if cfg.rollout_batch_size % cfg.minibatch_size:
        raise ConfigError(f"stages.{slot}: rollout_batch_size={cfg.rollout_batch_size} must be a multiple of minibatch_size={cfg.minibatch_size}")
    if cfg.micro_batch_size is not None and cfg.minibatch_size % cfg.micro_batch_size:
        raise ConfigError(f"stages.{slot}: minibatch_size={cfg.minibatch_size} must be a multiple of micro_batch_size={cfg.micro_batch_size}")
    if cfg.accumulate_grad_batches != 1:
        raise ConfigError(f"stages.{slot}: accumulate_grad_batches must be 1 (use minibatch_size)")
    if cfg.temperature <= 0:
        raise ConfigError(f"stages.{slot}.temperature must be > 0 for on-policy sampling")


def build_critic(ctx: StageContext) -> nn.Module:
    """A separate critic trunk: the policy's starting weights, trainable (LoRA / last-N as configured)."""
    critic = ctx.new_model()
    critic.load_state_dict(base_state_dict(ctx.policy) if has_lora(ctx.policy) else ctx.policy.state_dict())
    critic.requires_grad_(True)
    if ctx.cfg.lora.enabled:
        apply_lora(critic, ctx.cfg.lora)
    if ctx.cfg.critic_train_last_n_layers is not None:
        train_last_n_layers(critic, ctx.cfg.critic_train_last_n_layers)
    return critic


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    check_config(cfg, ctx.slot)
    if cfg.ptx_coef > 0 and not hasattr(ctx.task, "sft_example"):
        raise ConfigError(f"stages.{ctx.slot}.ptx_coef needs a task with solved examples (the built-in task)")
    if cfg.reward_slot is not None:
        ctx.stage_dir_of(cfg.reward_slot)  # fails early, naming the slot, if it does not run before
    critic = build_critic(ctx) if cfg.critic == "separate" else None
    # with LoRA the reference is the policy with adapters off; otherwise a frozen copy
    reference = None if has_lora(ctx.policy) else frozen_copy(ctx.policy, ctx.run_cfg.model, ctx.tokenizer.vocab_size)
    module = PPOModule(ctx, critic, reference)

    def make_batch(step: int, rank: int, world: int):
        return {"step": step, "prompts": rollout_prompts(ctx.task, ctx.seed, step, cfg.rollout_batch_size, rank, world)}

    ctx.fit(module, make_batch)
    final = {k: v for k, v in (module.history[-1] if module.history else {}).items() if k.startswith(("rollout/", "train/"))}
    return StageResult(ctx.policy, final)
