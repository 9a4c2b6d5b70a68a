"""What the RL stages (ppo, grpo) share: sampling and scoring a rollout, old log-probs,
minibatches, whitening statistics over a buffer, metrics and logging.

Layout: a rollout row is prompt + response, right-padded to a fixed width W, with a
response mask (B, W). Every per-token quantity (log-probs, values, advantages) is in the
SHIFTED layout of rlhf.logprobs.response_logprobs: (B, W - 1), entry t belonging to
token t + 1. `generate` returns the sampled tokens' log-probs per response position;
`Rollout` moves them into that layout so they can be compared with a scoring pass.

Old log-probs: the ratio in PPO/GRPO is pi_new / pi_old over the tokens sampled. We take
pi_old from a no-grad forward pass of the whole rollout in eval mode, the same code path
(and, without dropout, the same numbers) as the training forward, so the ratio is exactly
1 before the first update. We also keep the log-probs the sampler reported (KV cache,
left-padded) and check that the two agree: that is the test that we train on exactly the
distribution we sampled from (temperature included, no top-k/top-p filter).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from rlhf.errors import ConfigError, TrainingError
from rlhf.logprobs import response_logprobs
from rlhf.losses.policy_gradient import spread_vanishes
from rlhf.losses.policy_gradient import masked_mean
from rlhf.reward import RewardFn, reward_function
from rlhf.rollout_buffer import RolloutBuffer
from rlhf.sampling import SamplingConfig, encode_prompt, generate, join_prompt_response
from rlhf.training import mix_seed


@dataclass
class Rollout:
    """Sampled and scored responses, one row each (rows of a GRPO group are consecutive)."""

    prompts: list[str]
    responses: list[str]  # decoded, EOS stripped
    tokens: torch.Tensor  # (B, W) prompt + response (+ EOS), right-padded
    response_mask: torch.Tensor  # (B, W) bool
    sampled_logprobs: torch.Tensor  # (B, W - 1) shifted layout, 0 off the response
    rewards: torch.Tensor  # (B,) the stage's reward (verifier, function or reward model)
    verifier: Optional[torch.Tensor]  # (B,) the task's verifier score when the reward is something else

    @property
    def logprob_mask(self) -> torch.Tensor:
        return self.response_mask[:, 1:].float()

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1).float()


def rollout_prompts(task, seed: int, step: int, num_prompts: int, rank: int, world: int) -> list[str]:
    """This rank's share of rollout `step`'s prompts: a pure function of (seed, step)."""
    if num_prompts % world:
        raise ConfigError(f"rollout_batch_size={num_prompts} must be divisible by the number of processes ({world})")
    rng = random.Random(mix_seed(seed, "rollout_prompts", step))
    prompts = [task.train_prompt(rng) for _ in range(num_prompts)]
    return prompts[rank::world]


def rollout_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """The sampler's generator for rollout `step` on `rank`: replays exactly after a resume."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(seed, "rollout_sampling", step, rank))
    return gen


def sample_rollout(
    policy: nn.Module,
    tokenizer,
    prompts: list[str],
    reward_fn: RewardFn,
    *,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
    verifier: Optional[Callable[[str, str], Optional[float]]] = None,
) -> Rollout:
    """Sample one response per prompt (batched, KV cache), join it to its prompt and score it."""
    device = next(policy.parameters()).device
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, use_cache=True)
    gen = generate(policy, prompt_ids, sampling, tokenizer.eos_id, tokenizer.pad_id, generator)
    response_ids = gen.response_ids()
    tokens, mask = join_prompt_response(prompt_ids, response_ids, tokenizer.pad_id, device)
    sampled = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, device=device)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        # response token at position len(p) + j is entry len(p) + j - 1 of the shifted layout
        sampled[i, len(p) - 1 : len(p) - 1 + len(r)] = gen.logprobs[i, : len(r)]
    responses = [tokenizer.decode(r[:-1] if r and r[-1] == tokenizer.eos_id else r) for r in response_ids]
    rewards = torch.tensor(reward_fn(prompts, responses), dtype=torch.float32, device=device)
    verified = None
    if verifier is not None:
        scores = [verifier(p, r) for p, r in zip(prompts, responses)]
        if all(s is not None for s in scores):
            verified = torch.tensor(scores, dtype=torch.float32, device=device)
    return Rollout(prompts, responses, tokens, mask, sampled, rewards, verified)


def stage_reward(ctx, reward_fn: Optional[str], reward_slot: Optional[str]) -> tuple[RewardFn, Optional[Callable]]:
    """The reward (reward_slot, when set, replaces the reward_fn default) and, when that is
    not the task's verifier itself, the verifier to log beside it (reward hacking shows as
    the two diverging)."""
    fn = reward_function(ctx, None if reward_slot else reward_fn, reward_slot)
    verifier = None
    if reward_slot or reward_fn != "rlhf.tasks.builtin.verifier_reward":
        verifier = getattr(ctx.task, "score", None)
    return fn, verifier


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """No grad, eval mode (no dropout) for the block; each model's mode is restored after."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def policy_logprobs(logits: torch.Tensor, tokens: torch.Tensor, response_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Shifted log-probs of the rollout's tokens under softmax(logits / temperature): the
    distribution the sampler drew from (rlhf.logprobs does the shifting)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return response_logprobs(logits, tokens, response_mask)[0]


def check_sampled_logprobs(sampled: torch.Tensor, recomputed: torch.Tensor, mask: torch.Tensor, tolerance: float, slot: str) -> float:
    """Mean |sampled - recomputed| over response tokens; fails loudly when it exceeds `tolerance`."""
    mismatch = float(masked_mean((sampled - recomputed).abs(), mask))
    if mismatch > tolerance:
        raise TrainingError(
            f"stage {slot!r}: the sampler's log-probs differ from a scoring pass by {mismatch:.4g} per token "
            f"(tolerance {tolerance}); the ratio would not be on-policy"
        )
    return mismatch


def minibatches(num_rows: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded permutation of the rows cut into minibatches of `size` (num_rows must be a multiple)."""
    perm = torch.randperm(num_rows, generator=generator)
    return list(perm.split(size))


def minibatch_generator(seed: int, step: int, epoch: int, rank: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(mix_seed(seed, "minibatches", step, epoch, rank))
    return gen


def per_rank(total: int, world: int, name: str) -> int:
    if total % world:
        raise ConfigError(f"{name}={total} must be divisible by the number of processes ({world})")
    return total // world


def trim(batch: dict[str, torch.Tensor], mask_key: str = "response_mask") -> dict[str, torch.Tensor]:
    """Cut every (B, W) / (B, W - 1) tensor after the last column any row uses (saves compute)."""
    mask = batch[mask_key]
    used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    out = {}
    for name, value in batch.items():
        if value.dim() == 2 and value.shape[1] == mask.shape[1]:
            out[name] = value[:, :used]
        elif value.dim() == 2 and value.shape[1] == mask.shape[1] - 1:
            out[name] = value[:, : used - 1]
        else:
            out[name] = value
    return out


def make_buffer(kind: str, stage_dir: Path, rank: int, rows: int, width: int, fields: dict[str, str]) -> RolloutBuffer:
    """A rollout buffer of `rows` rows: fields map name -> "tokens" (W, int64), "mask" (W, bool),
    "shifted" (W - 1, float32) or "row" (a scalar float32)."""
    import numpy as np

    shapes = {"tokens": ((width,), np.int64), "mask": ((width,), np.bool_), "shifted": ((width - 1,), np.float32), "row": ((), np.float32)}
    spec = {name: shapes[what] for name, what in fields.items()}
    return RolloutBuffer(rows, spec, kind=kind, directory=Path(stage_dir) / "rollout_buffer" / f"rank{rank}")


class MaskedMoments:
    """Mean and (population) variance of masked entries accumulated chunk by chunk.

    Whitening advantages needs statistics over the whole rollout, which may live in a
    memmapped buffer written in chunks; this gives the same numbers as masked_whiten's
    over one tensor (tested)."""

    def __init__(self):
        self.total = self.total_sq = self.count = 0.0

    def add(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.bool()
        values = x[m].double()
        self.total += float(values.sum())
        self.total_sq += float((values**2).sum())
        self.count += float(m.sum())

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1.0)

    @property
    def var(self) -> float:
        return max(self.total_sq / max(self.count, 1.0) - self.mean**2, 0.0)

    @property
    def constant(self) -> bool:
        """Whether every entry added so far is equal up to rounding (the variance is noise)."""
        return bool(spread_vanishes(self.var**0.5, self.mean))

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """(x - mean) / sqrt(var + eps) on masked entries, 0 elsewhere; exactly 0 everywhere
        when the accumulated entries are all equal (`constant`), not amplified rounding."""
        if self.constant:
            return torch.zeros_like(x)
        out = (x.double() - self.mean) * (self.var + eps) ** -0.5
        return torch.where(mask.bool(), out, torch.zeros_like(out)).to(x.dtype)


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def mid_training_eval(policy: nn.Module, task, tokenizer, run_cfg, num_prompts: int) -> dict[str, float]:
    """Greedy held-out evaluation (the orchestrator's, on fewer prompts) during an RL stage."""
    from rlhf.config import EvalConfig
    from rlhf.evaluation import evaluate_policy

    # greedy only (samples_per_prompt=0): pass@k would make it k times dearer; the stage's end measures it
    eval_cfg = EvalConfig(
        num_prompts=num_prompts, max_new_tokens=run_cfg.eval.max_new_tokens, batch_size=run_cfg.eval.batch_size, num_logged_samples=0, samples_per_prompt=0
    )
    metrics, _ = evaluate_policy(policy, task, tokenizer, eval_cfg)
    return metrics


def log_samples(logger, step: int, rollout: Rollout, count: int) -> None:
    """A wandb table of a few of the rollout's responses with their rewards."""
    if logger is None or count <= 0:
        return
    rows = []
    for i in range(min(count, len(rollout.prompts))):
        verifier = float(rollout.verifier[i]) if rollout.verifier is not None else None
        rows.append([step, rollout.prompts[i], rollout.responses[i], float(rollout.rewards[i]), verifier])
    logger.log_text(key="rollout/samples", columns=["rollout", "prompt", "response", "reward", "verifier_score"], data=rows)


def mean_over_ranks(module, metrics: dict[str, float]) -> dict[str, float]:
    """Average each metric over the DDP processes (each holds an equal share of the rollout)."""
    names = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64, device=module.device)
    values = module.trainer.strategy.reduce(values, reduce_op="mean")
    return {k: float(v) for k, v in zip(names, values.tolist())}


def write_history(stage_dir: Path, history: list[dict]) -> None:
    """Per-rollout metrics, one JSON line per rollout, rewritten atomically (rank 0)."""
    from rlhf.files import write_jsonl

    write_jsonl(Path(stage_dir) / "rollout_metrics.jsonl", history)
