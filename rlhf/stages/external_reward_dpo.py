"""External-reward DPO: online rounds of sample -> score -> best vs worst -> one pass of DPO.

Round r covers optimizer steps r*S .. (r+1)*S - 1 (S = steps_per_round). At its first step:
  1. the current policy is evaluated on held-out prompts (`eval/task_score`), so a
     collapse shows up while the stage runs;
  2. batch_size * S training prompts (a pure function of (seed, r)) get `num_candidates`
     responses each, sampled from the CURRENT policy with the KV cache;
  3. a reward function scores them: `reward_fn` (a dotted path) or `reward_slot` (an
     earlier reward_model stage); neither set means the built-in verifier;
  4. each prompt gives one pair, its best over its worst candidate; prompts whose
     candidates all score the same (ties), with fewer than two scores, or (optionally)
     whose best is below `min_chosen_reward` are dropped and counted;
  5. the reference's log-probs of the pairs are computed once (the round's starting
     weights, or with `refresh_reference: false` the stage's), so training never runs a
     reference;
  6. everything goes to `rounds/round_<r>.jsonl` (every candidate with its reward, the
     pair or why there is none, the reference log-probs).
The S steps then go once through the round's pairs (in a seeded order, ~pairs/S per step).

Resume: batches are only (round, step-in-round) indices; the round's pairs live on the
module. A run resumed mid-round reloads the round's file instead of sampling again from
weights that are no longer the round's starting weights.
DDP: each rank samples and scores its share of the prompts; the rows are all-gathered so
every rank holds the whole round and trains on its shard of each step's pairs.
A round with no pair at all still takes its S steps, with a zero loss (so AdamW's momentum
still moves the weights a little); raise num_candidates or temperature if that happens.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import lightning as L
import torch

from rlhf.config import StageConfig
from rlhf.errors import ConfigError, DataError
from rlhf.models import gather_policy, shard_in
from rlhf.preference_batch import (
    PreferenceLossConfig,
    check_loss_config,
    log_now,
    needs_reference,
    pair_logprobs,
    preference_loss,
    starting_reference,
)
from rlhf.reward import reward_function
from rlhf.sampling import SamplingConfig, generate_responses
from rlhf.rounds import (
    RoundPairs,
    all_round_rows,
    attach_reference,
    gather_rows,
    load_or_make,
    mark_finished,
    new_round_rows,
    recent_means,
    round_batches,
    round_path,
    round_training_step,
)
from rlhf.stage_context import StageContext, StageResult
from rlhf.training import adamw_with_schedule, mix_seed

KIND = "external_reward_dpo"
DEFAULT_REWARD_FN = "rlhf.tasks.builtin.verifier_reward"
STATUSES = {"pair": "pairs", "tie": "ties", "missing": "missing", "low": "low"}  # a row's status -> metric name
log = logging.getLogger("rlhf")


@dataclass
class Config(PreferenceLossConfig, StageConfig):
    kind: str = KIND
    # defaults measured on the built-in task (docs/results_dpo.md): many short rounds, a low
    # lr, NLL weight 1, samples at temperature 0.7; higher lr collapsed within a round or two
    max_steps: int = 48  # rounds = ceil(max_steps / steps_per_round)
    steps_per_round: int = 4
    batch_size: int = 64  # prompts per step: a round samples batch_size * steps_per_round prompts
    lr: float = 5e-5
    warmup_steps: int = 8
    nll_weight: float = 1.0
    num_candidates: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 24
    generation_batch_size: int = 256  # sequences per generate() call
    reward_fn: Optional[str] = None  # dotted path; None and no reward_slot: the built-in verifier
    reward_slot: Optional[str] = None  # an earlier reward_model slot
    min_reward_gap: float = 0.0  # best - worst must exceed this, or the prompt is a tie
    # the best must reach this to be "chosen" (1.0 with the verifier: only exact answers); None: any
    min_chosen_reward: Optional[float] = None
    # reference = each round's starting weights (the policy that sampled the pairs), so every
    # round's implicit rewards start at 0; False: the stage's starting weights throughout
    refresh_reference: bool = True
    eval_prompts: int = 64  # held-out prompts evaluated at the start of every round; 0: off


def best_vs_worst(
    prompt: str,
    responses: Sequence[str],
    rewards: Sequence[Optional[float]],
    min_gap: float = 0.0,
    min_chosen: Optional[float] = None,
    finished: Optional[Sequence[bool]] = None,
) -> dict:
    """One prompt's row: every candidate with its reward, and its pair or why it has none.

    status "pair": chosen = the (first) best, rejected = the (first) worst candidate;
    "tie": best - worst <= min_gap; "missing": fewer than two candidates have a finite reward;
    "low": the best reward is below min_chosen. `finished` (default: all) says which
    candidates ended with EOS; a pair records it as chosen_finished / rejected_finished.
    """
    clean = [float(s) if s is not None and math.isfinite(s) else None for s in rewards]
    done = [True] * len(responses) if finished is None else [bool(f) for f in finished]
    row = {
        "prompt": prompt,
        "candidates": [{"response": r, "reward": s, "finished": f} for r, s, f in zip(responses, clean, done)],
        "status": "missing",
        "chosen": None,
        "rejected": None,
    }
    scored = [(s, r) for r, s in zip(responses, clean) if s is not None]
    if len(scored) < 2:
        return row
    best = max(scored, key=lambda x: x[0])
    worst = min(scored, key=lambda x: x[0])
    if best[0] - worst[0] <= min_gap:
        row["status"] = "tie"
        return row
    if min_chosen is not None and best[0] < min_chosen:
        row["status"] = "low"
        return row
    row.update(status="pair", chosen=best[1], rejected=worst[1], chosen_reward=best[0], rejected_reward=worst[0])
    mark_finished(row, row["candidates"])
    return row


def no_pair_cause(rows: list[dict]) -> str:
    """Why these rows made no pair, by count, with one row's rewards."""
    count = {s: sum(row["status"] == s for row in rows) for s in STATUSES}
    example = next((row for row in rows if row["status"] != "pair"), None)
    rewards = [c["reward"] for c in example["candidates"]] if example else []
    return (
        f"{count['tie']} prompts tied (best - worst <= min_reward_gap), {count['missing']} had fewer than two finite rewards, "
        f"{count['low']} had a best below min_chosen_reward (one prompt's rewards: {rewards})"
    )


def round_stats(rows: list[dict]) -> dict[str, float]:
    rewards = [c["reward"] for row in rows for c in row["candidates"] if c["reward"] is not None]
    best = [max(c["reward"] for c in row["candidates"] if c["reward"] is not None) for row in rows if row["status"] != "missing"]
    count = {s: sum(row["status"] == s for row in rows) for s in STATUSES}
    return {
        **{f"round/{name}": float(count[s]) for s, name in STATUSES.items()},
        "round/mean_reward": sum(rewards) / max(1, len(rewards)),
        "round/best_of_n_reward": sum(best) / max(1, len(best)),
    }


class OnlineDPOModule(L.LightningModule):
    def __init__(self, ctx: StageContext, reference: Optional[torch.nn.Module]):
        super().__init__()
        self.policy, self.cfg, self.ctx = ctx.policy, ctx.cfg, ctx
        object.__setattr__(self, "reference", reference)  # not a submodule: out of optimizer, DDP, checkpoints
        self.reward = None
        self.round = -1
        self.data: Optional[RoundPairs] = None
        self.recent: deque = deque(maxlen=20)
        self.last_round: dict[str, float] = {}

    def configure_model(self):
        shard_in(self, self.policy)  # trainer.strategy=fsdp (rlhf/models/fsdp.py)

    def on_train_start(self):
        # built here, once the policy is on its device, so a reward model lands there too
        cfg = self.cfg
        reward_fn = cfg.reward_fn if (cfg.reward_fn or cfg.reward_slot) else DEFAULT_REWARD_FN
        self.reward = reward_function(self.ctx, reward_fn, cfg.reward_slot)
        if self.reference is not None:
            self.reference.to(self.device)

    def on_train_batch_start(self, batch, batch_idx):
        r = int(batch[0])
        if r != self.round:
            self._start_round(r)

    # -- a round's pairs --------------------------------------------------------------------
    def _start_round(self, r: int) -> None:
        rows, reloaded = load_or_make(round_path(self.ctx.stage_dir, r), lambda: new_round_rows(self, r, self._make_rows, self.cfg.eval_prompts), self.trainer.is_global_zero)
        if reloaded:  # resumed mid-round: the weights are no longer the round's start
            log.info("%s round %d: reloaded", self.ctx.slot, r)
        self.data = RoundPairs.best_vs_worst(rows, needs_reference(self.cfg), self.ctx.tokenizer, self.ctx.policy.max_seq_len, self.ctx.seed, r)
        self.round = r
        stats = round_stats(rows)
        self.last_round.update(stats)
        log_now(self, stats)
        log.info("%s round %d: %s", self.ctx.slot, r, {k: round(v, 4) for k, v in stats.items()})

    def _make_rows(self, r: int) -> list[dict]:
        """Sample, score and pair this rank's share of round r's prompts; gather all ranks' rows."""
        cfg, task, tok = self.cfg, self.ctx.task, self.ctx.tokenizer
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rng = random.Random(mix_seed(self.ctx.seed, "prompts", r))
        prompts = [task.train_prompt(rng) for _ in range(cfg.batch_size * cfg.steps_per_round)]
        mine = list(range(len(prompts)))[rank::world]
        repeated = [prompts[i] for i in mine for _ in range(cfg.num_candidates)]
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(self.ctx.seed, "sample", r, rank))
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        # sharded: every rank gathers the whole weights once for the round and samples with them
        # (a sharded model would all-gather every layer at every decoding step, in lockstep)
        sampler = gather_policy(self.policy, self.ctx.new_policy)
        responses, finished = generate_responses(sampler, tok, repeated, sampling, cfg.generation_batch_size, generator)
        rewards = list(self.reward(repeated, responses))
        n = cfg.num_candidates
        rows = [
            {"index": i, **best_vs_worst(prompts[i], responses[j * n : (j + 1) * n], rewards[j * n : (j + 1) * n], cfg.min_reward_gap, cfg.min_chosen_reward, finished[j * n : (j + 1) * n])}
            for j, i in enumerate(mine)
        ]
        if needs_reference(cfg):
            model = sampler if cfg.refresh_reference else self.reference
            attach_reference(rows, model, tok, self.ctx.policy.max_seq_len, cfg.batch_size, self.device)
        return gather_rows(rows, world)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        return round_training_step(self, batch, lambda tokens, mask, ref: preference_loss(self.cfg, *pair_logprobs(self.policy, tokens, mask), ref))

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.cfg)

    def final_metrics(self) -> dict[str, float]:
        out = recent_means(self.recent)
        # totals over every round's file, so rounds run before a resume count too
        totals = {f"rounds/{name}": 0.0 for name in STATUSES.values()}
        for row in all_round_rows(self.ctx.stage_dir):
            totals[f"rounds/{STATUSES[row['status']]}"] += 1
        return {**out, **self.last_round, **totals}


def check_config(cfg: Config, slot: str) -> None:
    """The checks that need no model or task; rlhf.config runs them when the run's config is
    read, so they fail before any stage trains."""
    check_loss_config(cfg, slot)
    if cfg.steps_per_round < 1 or cfg.num_candidates < 2:
        raise ConfigError(f"stages.{slot}: steps_per_round must be >= 1 and num_candidates >= 2")


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    check_config(cfg, ctx.slot)
    if not hasattr(ctx.task, "train_prompt"):
        raise ConfigError(f"stages.{ctx.slot}: task {ctx.run_cfg.task.name!r} has no training prompts to sample from")
    if cfg.reward_slot is not None:
        ctx.stage_dir_of(cfg.reward_slot)  # fail now, not at the first round
    reference = None
    if needs_reference(cfg) and not cfg.refresh_reference:
        reference = starting_reference(ctx)
    module = OnlineDPOModule(ctx, reference)
    ctx.fit(module, round_batches(cfg.steps_per_round * cfg.accumulate_grad_batches))
    metrics = module.final_metrics()
    if not metrics["rounds/pairs"]:  # the stage trained on nothing: never mark it complete
        raise DataError(f"stages.{ctx.slot}: no usable pair in any round, nothing was trained: {no_pair_cause(all_round_rows(ctx.stage_dir))}")
    return StageResult(ctx.policy, metrics)
