"""GRPO and its critic-free relatives: Dr. GRPO and RLOO (`advantage: grpo|dr_grpo|rloo`).

For each of `rollout_batch_size` prompts, `group_size` responses are sampled (batched, KV
cache); each response's advantage is its reward relative to the others of its group
(rlhf.losses.policy_gradient.group_advantages): no value model. The loss is the
token-level clipped surrogate of `grpo_policy_loss`, aggregated as the advantage kind
prescribes (GRPO: a mean over each response's tokens; RLOO: their sum, REINFORCE on the whole
sequence), with an optional k3 KL penalty to the reference (`kl_coef`, 0 by default; the
KL is measured and logged anyway unless `track_kl` is off). `ppo_epochs` passes over
`minibatch_size`-row minibatches per rollout, like PPO; the default is one update per
rollout, as in DeepSeekMath.

Variants as settings: DAPO's clip-higher (`clip_eps_high`) and token-level loss
(`loss_type: dapo`, Yu et al. 2025), and GSPO's
sequence-level ratio (`ratio_level: sequence`, Zheng et al. 2025), named as in TRL's
`epsilon_high` and `importance_sampling_level`; see grpo_policy_loss.

RLOO is a setting of this stage, not a separate kind, because stages never import each
other and a second module would copy this one:

    python -m rlhf run recipe=grpo stages.grpo.advantage=rloo

Rollouts, resume and logging work as in the ppo stage (rlhf/rollout.py); one Lightning
step = one rollout. Old log-probs: with several updates per rollout, a no-grad eval-mode
pass as in ppo; with one update per rollout (the default) the training forward's own,
detached, which saves a forward pass (the sampler's log-probs are still checked against
them; with model dropout > 0 that check needs a looser `logprob_tolerance`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import lightning as L
import torch

from rlhf.config import StageConfig
from rlhf.errors import ConfigError
from rlhf.losses.policy_gradient import GROUP_ADVANTAGE_KINDS, GRPO_LOSS_KINDS, RATIO_LEVELS, entropy_from_logits, group_advantages, grpo_policy_loss, masked_mean
from rlhf.models import disabled_adapters, frozen_copy, gather_policy, has_lora, shard_in
from rlhf.rollout import (
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
from rlhf.sampling import encode_prompt
from rlhf.stage_context import StageContext, StageResult
from rlhf.training import adamw_with_schedule, check_finite

KIND = "grpo"


@dataclass
class Config(StageConfig):
    kind: str = KIND
    max_steps: int = 100  # rollouts
    lr: float = 2e-5  # measured: 1e-4 drifts far from the reference within a few rollouts (docs/results_rl.md)
    warmup_steps: int = 0  # in rollouts
    min_lr_ratio: float = 1.0  # constant learning rate
    rollout_batch_size: int = 16  # prompts per rollout (all processes together)
    group_size: int = 8  # responses per prompt
    minibatch_size: Optional[int] = None  # rows per update (all processes); None = the whole rollout
    micro_batch_size: Optional[int] = None  # rows per forward/backward inside a minibatch (less memory); None = all
    ppo_epochs: int = 1
    advantage: str = "grpo"  # grpo | dr_grpo | rloo (also selects the loss aggregation)
    loss_type: Optional[str] = None  # the loss aggregation if not the advantage's: dapo (token-level), grpo, dr_grpo, rloo
    generation_batch_size: int = 128  # rows per generate() call on one process
    max_new_tokens: int = 24
    temperature: float = 1.0
    reward_fn: Optional[str] = "rlhf.tasks.builtin.verifier_reward"
    reward_slot: Optional[str] = None  # an earlier reward_model slot; replaces reward_fn when set
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None  # DAPO's clip-higher (0.28 in the paper); None: clip_eps
    ratio_level: str = "token"  # token | sequence (GSPO: one length-normalised ratio per response)
    kl_coef: float = 0.0  # k3 penalty to the reference inside the loss
    track_kl: bool = True  # measure the KL to the reference even when kl_coef is 0
    buffer: str = "memory"  # memory | memmap
    eval_every: int = 10
    eval_num_prompts: int = 100
    num_logged_samples: int = 8
    logprob_tolerance: float = 0.05


class GRPOModule(L.LightningModule):
    def __init__(self, ctx: StageContext, reference: Optional[torch.nn.Module], use_reference: bool):
        super().__init__()
        cfg = ctx.cfg
        self.automatic_optimization = False
        rows = cfg.rollout_batch_size * cfg.group_size
        self.minibatch_rows = cfg.minibatch_size or rows
        self.optimizer_steps_per_batch = cfg.ppo_epochs * (rows // self.minibatch_rows)
        # one update per rollout: pi_old IS the policy being updated, so the ratio's old log-probs
        # are the training forward's own, detached (ratio 1, gradient = the policy gradient), and
        # the separate eval-mode pass is skipped, as TRL does (assumes no dropout, the default)
        self.single_update = self.optimizer_steps_per_batch == 1
        self.policy = ctx.policy
        self._reference = [reference]  # kept out of the state dict and the optimizer
        self.use_reference = use_reference
        self.ctx, self.cfg = ctx, cfg
        self.history: list[dict] = []

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.cfg)

    def configure_model(self):
        shard_in(self, self.policy)  # trainer.strategy=fsdp (rlhf/models/fsdp.py)

    def on_fit_start(self):
        if self._reference[0] is not None:
            self._reference[0].to(self.device)
        self.reward_fn, self.verifier = stage_reward(self.ctx, self.cfg.reward_fn, self.cfg.reward_slot)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["grpo"] = {"history": self.history}

    def on_load_checkpoint(self, checkpoint):
        self.history = checkpoint["grpo"]["history"]

    def reference_logprobs(self, tokens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        if self._reference[0] is None:  # LoRA: the base weights are the reference
            with disabled_adapters(self.policy):
                logits = self.policy(tokens)
        else:
            logits = self._reference[0](tokens)
        return policy_logprobs(logits, tokens, response_mask, self.cfg.temperature)

    def collect(self, step: int, prompts: list[str]):
        """Sample group_size responses per prompt, score them, and fill a buffer with old (and reference) log-probs."""
        cfg, ctx, tok = self.cfg, self.ctx, self.ctx.tokenizer
        rows = [p for p in prompts for _ in range(cfg.group_size)]  # a group's rows are consecutive
        width = max(len(encode_prompt(tok, p)) for p in prompts) + cfg.max_new_tokens
        fields = {"tokens": "tokens", "response_mask": "mask", "sampled_logprobs": "shifted", "advantages": "row"}
        if not self.single_update:
            fields["old_logprobs"] = "shifted"
        if self.use_reference:
            fields["ref_logprobs"] = "shifted"
        buffer = make_buffer(cfg.buffer, ctx.stage_dir, self.global_rank, len(rows), width, fields)
        generator = rollout_generator(ctx.seed, step, self.global_rank, self.device)
        # sharded: every rank gathers the whole weights once per rollout to sample and score with
        # (a sharded model would all-gather every layer at every decoding step, in lockstep)
        sampler = gather_policy(self.policy, ctx.new_policy)
        parts = defaultdict(list)
        for start, stop in chunks(len(rows), cfg.generation_batch_size):
            ro = sample_rollout(sampler, tok, rows[start:stop], self.reward_fn, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=generator, verifier=self.verifier)
            mask = ro.logprob_mask
            buffer.write(start, tokens=ro.tokens, response_mask=ro.response_mask, sampled_logprobs=ro.sampled_logprobs)
            with eval_mode(sampler):
                if not self.single_update:
                    old_logprobs = policy_logprobs(sampler(ro.tokens), ro.tokens, ro.response_mask, cfg.temperature)
                    parts["mismatch"].append(check_sampled_logprobs(ro.sampled_logprobs, old_logprobs, mask, cfg.logprob_tolerance, ctx.slot))
                    buffer.write(start, old_logprobs=old_logprobs)
                if self.use_reference:
                    ref_logprobs = self.reference_logprobs(ro.tokens, ro.response_mask)
                    buffer.write(start, ref_logprobs=ref_logprobs)
                    parts["kl"].append(((ro.sampled_logprobs - ref_logprobs) * mask).sum(1))  # k1 per sequence
            parts["rewards"].append(ro.rewards)
            parts["lengths"].append(ro.response_lengths)
            if ro.verifier is not None:
                parts["verifier"].append(ro.verifier)
            if start == 0:
                first = ro
        rewards = torch.cat(parts["rewards"])
        advantages = group_advantages(rewards, cfg.group_size, cfg.advantage)
        buffer.write(0, advantages=advantages)
        buffer.flush()
        grouped = rewards.view(-1, cfg.group_size)
        everyone = self.all_gather(rewards).flatten()
        metrics = {
            "rollout/reward_mean": float(everyone.mean()),
            "rollout/reward_std": float(everyone.std()) if everyone.numel() > 1 else 0.0,
            "rollout/group_reward_std": float(grouped.std(1, unbiased=False).mean()),
            "rollout/zero_std_groups": float((advantages.view(-1, cfg.group_size) == 0).all(1).float().mean()),  # groups with no learning signal
            "rollout/response_length": float(torch.cat(parts["lengths"]).mean()),
        }
        if parts["mismatch"]:
            metrics["rollout/logprob_mismatch"] = sum(parts["mismatch"]) / len(parts["mismatch"])
        if parts["kl"]:
            metrics["rollout/kl"] = float(torch.cat(parts["kl"]).mean())
        if parts["verifier"]:
            metrics["rollout/verifier_score"] = float(torch.cat(parts["verifier"]).mean())
        return buffer, metrics, first

    def minibatch_loss(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The GRPO loss over these rows (a mean over sequences) and its parts."""
        cfg = self.cfg
        tokens, mask = mb["tokens"], mb["response_mask"][:, 1:].float()
        logits = self.policy(tokens)
        logprobs = policy_logprobs(logits, tokens, mb["response_mask"], cfg.temperature)
        parts: dict[str, float] = {}
        if self.single_update:  # the policy that sampled is the one being updated: its own log-probs, detached
            old_logprobs = logprobs.detach()
            parts["rollout/logprob_mismatch"] = check_sampled_logprobs(mb["sampled_logprobs"], old_logprobs, mask, cfg.logprob_tolerance, self.ctx.slot)
        else:
            old_logprobs = mb["old_logprobs"]
        loss, stats = grpo_policy_loss(
            logprobs, old_logprobs, mb["advantages"], mask, cfg.clip_eps, cfg.loss_type or cfg.advantage,
            max_len=cfg.max_new_tokens, ref_logp=mb.get("ref_logprobs"), kl_coef=cfg.kl_coef,
            clip_eps_high=cfg.clip_eps_high, ratio_level=cfg.ratio_level,
        )
        with torch.no_grad():
            parts["rollout/entropy"] = float(masked_mean(entropy_from_logits(logits[:, :-1].float() / cfg.temperature), mask))
        parts["train/loss"] = float(loss.detach())
        parts["train/clip_fraction"] = float(stats["clip_fraction"])
        if "kl" in stats:
            parts["train/kl_k3"] = float(stats["kl"])
        return loss, parts

    def training_step(self, batch, batch_idx):
        cfg, step = self.cfg, batch["step"]
        buffer, metrics, first = self.collect(step, batch["prompts"])
        opt, sched = self.optimizers(), self.lr_schedulers()
        world = self.trainer.world_size
        rows = len(batch["prompts"]) * cfg.group_size
        size = per_rank(self.minibatch_rows, world, "minibatch_size")
        micro = per_rank(cfg.micro_batch_size, world, "micro_batch_size") if cfg.micro_batch_size else size
        sums, updates = defaultdict(float), 0
        for epoch in range(cfg.ppo_epochs):
            for idx in minibatches(rows, size, minibatch_generator(self.ctx.seed, step, epoch, self.global_rank)):
                mb = buffer.read(idx)
                total_tokens = float(mb["response_mask"][:, 1:].sum().clamp(min=1))
                opt.zero_grad()
                for part in torch.arange(len(idx)).split(micro):
                    # the loss is a mean over sequences (over tokens for dapo): micro-batches weighted by
                    # rows (tokens) add up exactly; the per-token metrics are weighted by tokens
                    chunk = trim({k: v[part].to(self.device) for k, v in mb.items()})
                    weight, token_weight = len(part) / len(idx), float(chunk["response_mask"][:, 1:].sum()) / total_tokens
                    weight = token_weight if cfg.loss_type == "dapo" else weight
                    loss, parts = self.minibatch_loss(chunk)
                    check_finite(loss, self.ctx.slot, step)
                    self.manual_backward(loss * weight)
                    for name, value in parts.items():
                        sums[name] += value * (weight if name == "train/loss" else token_weight)
                if cfg.grad_clip:
                    self.clip_gradients(opt, gradient_clip_val=cfg.grad_clip, gradient_clip_algorithm="norm")
                opt.step()
                updates += 1
        sched.step()
        buffer.close()
        metrics.update({k: v / updates for k, v in sums.items()})
        metrics["train/lr"] = sched.get_last_lr()[0]
        metrics = mean_over_ranks(self, metrics)
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
    """The checks that need no model or task; rlhf.config runs them when the run's config is
    read, so they fail before any stage trains."""
    if cfg.advantage not in GROUP_ADVANTAGE_KINDS:
        raise ConfigError(f"stages.{slot}.advantage={cfg.advantage!r} is not one of: {', '.join(GROUP_ADVANTAGE_KINDS)}")
    if cfg.group_size < 2:
        raise ConfigError(f"stages.{slot}.group_size must be >= 2 (advantages are relative to the group)")
    if cfg.loss_type is not None and cfg.loss_type not in GRPO_LOSS_KINDS:
        raise ConfigError(f"stages.{slot}.loss_type={cfg.loss_type!r} is not one of: {', '.join(GRPO_LOSS_KINDS)}")
    if cfg.ratio_level not in RATIO_LEVELS:
        raise ConfigError(f"stages.{slot}.ratio_level={cfg.ratio_level!r} is not one of: {', '.join(RATIO_LEVELS)}")
    if cfg.ratio_level == "sequence" and cfg.loss_type == "dapo":
        raise ConfigError(f"stages.{slot}: loss_type=dapo averages over tokens, ratio_level=sequence over sequences; choose one")
    if cfg.clip_eps_high is not None and cfg.clip_eps_high < 0:
        raise ConfigError(f"stages.{slot}.clip_eps_high={cfg.clip_eps_high} must be >= 0")
    rows = cfg.rollout_batch_size * cfg.group_size
    if cfg.minibatch_size is not None and rows % cfg.minibatch_size:
        raise ConfigError(f"stages.{slot}: rollout_batch_size * group_size = {rows} must be a multiple of minibatch_size={cfg.minibatch_size}")
    if cfg.micro_batch_size is not None and (cfg.minibatch_size or rows) % cfg.micro_batch_size:
        raise ConfigError(f"stages.{slot}: the minibatch ({cfg.minibatch_size or rows} rows) must be a multiple of micro_batch_size={cfg.micro_batch_size}")
    if cfg.accumulate_grad_batches != 1:
        raise ConfigError(f"stages.{slot}: accumulate_grad_batches must be 1 (use minibatch_size)")
    if cfg.temperature <= 0:
        raise ConfigError(f"stages.{slot}.temperature must be > 0 for on-policy sampling")
    if cfg.reward_slot is not None:
        ctx.stage_dir_of(cfg.reward_slot)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    check_config(cfg, ctx.slot)
    use_reference = cfg.kl_coef > 0 or cfg.track_kl
    reference = None
    if use_reference and not has_lora(ctx.policy):
        reference = frozen_copy(ctx.policy, ctx.run_cfg.model, ctx.tokenizer.vocab_size)
    module = GRPOModule(ctx, reference, use_reference)

    def make_batch(step: int, rank: int, world: int):
        return {"step": step, "prompts": rollout_prompts(ctx.task, ctx.seed, step, cfg.rollout_batch_size, rank, world)}

    ctx.fit(module, make_batch)
    final = {k: v for k, v in (module.history[-1] if module.history else {}).items() if k.startswith(("rollout/", "train/"))}
    return StageResult(ctx.policy, final)
