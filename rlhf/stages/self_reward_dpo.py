"""Self-rewarding DPO (Yuan et al. 2024): the model writes candidates, judges them itself, and
learns from its own best-vs-worst pairs.

One stage is one iteration M_t -> M_t+1. Its optimizer steps are split into rounds of
`steps_per_round` steps; at the first step of round r:
  1. `batch_size * steps_per_round` training prompts, a pure function of (seed, r), get
     `num_candidates` responses each from the CURRENT weights (temperature 0.7, top-p 0.9,
     KV cache);
  2. the same weights judge every candidate `judge.num_samples` times (rlhf/judge.py: the
     template, the score regex, the range); a candidate's score is the mean of its parseable
     judge samples;
  3. identical responses are merged (their scores averaged); the pair is the best over the
     worst. A prompt with fewer than two scored responses is dropped as "unparseable", one
     whose best and worst scores differ by no more than `min_score_gap` as a "tie"; both are
     counted, neither stops the run;
  4. the reference's log-probs of the pairs are computed once. The reference is the
     iteration's starting weights (a frozen copy), as in the paper: M_t for M_t+1;
  5. everything (prompt, every candidate, every raw judgement, its parsed score, the
     verifier's score where the task has one, the pair or why there is none, the reference
     log-probs) goes to `rounds/round_<r>.jsonl`, written atomically by rank 0.
The round's steps then make about one pass over its fresh pairs with DPO plus an NLL term
on the chosen response (`nll_weight`, on by default: plain DPO collapses small models).
With `judge_batch_size` > 0 each step also trains on that many of the task's judging
examples (NLL, weighted by `judge_weight`): the seed evaluation data of the paper's M1,
replayed so the judge is not forgotten while DPO moves the policy; with `judge_examples=own`
they are the round's own candidates with the task verifier's verdicts (EFT data from the
model's current mistakes).

Resume: one `ctx.fit` covers every round; a resumed run reloads round r's file instead of
sampling again from weights that are no longer the round's starting weights.
DDP: each rank samples and judges its share of the prompts; rows are all-gathered, so every
rank holds the whole round and trains on its shard of each step's pairs.

Measured (the verifier is never used for training, only reported): `eval/judge_agreement`
and friends on held-out prompts at the stage's start (`start/...`) and end, round statistics
(pairs, ties, unparseable, parse failures, mean response length, how often the chosen
response really is better: `round/pair_accuracy`), and `eval/kl`: the mean over sampled
held-out responses of sum(log pi - log pi_ref), where pi_ref is the stage's starting weights
or, with `kl_reference: <slot>`, that earlier slot's weights (the recipes use the SFT slot).
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch

from rlhf import files
from rlhf.config import StageConfig
from rlhf.errors import ConfigError, DataError
from rlhf.judge import JudgeConfig, evaluate_judge, judge, own_judging_examples, template_fields
from rlhf.logprobs import response_nll, sequence_logprobs
from rlhf.models import gather_policy, load_weights, shard_in
from rlhf.preference_batch import (
    PreferenceLossConfig,
    check_loss_config,
    log_now,
    needs_reference,
    pair_logprobs,
    preference_loss,
    starting_reference,
)
from rlhf.sampling import SamplingConfig, encode_examples, encode_prompt, generate, generate_responses, join_prompt_response
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
from rlhf.training import adamw_with_schedule, check_finite, mix_seed

KIND = "self_reward_dpo"
log = logging.getLogger("rlhf")


@dataclass
class Config(PreferenceLossConfig, StageConfig):
    kind: str = KIND
    max_steps: int = 24  # rounds = ceil(max_steps / steps_per_round)
    steps_per_round: int = 8
    batch_size: int = 32  # prompts per step: a round samples batch_size * steps_per_round prompts
    lr: float = 2e-5
    warmup_steps: int = 4
    num_candidates: int = 4
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 24
    generation_batch_size: int = 256  # sequences per generate() call
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    min_score_gap: float = 0.0  # best - worst judge score must exceed this, or the prompt is a tie
    eval_prompts: int = 64  # held-out prompts: task score every round, judge agreement and KL at start/end; 0: off
    kl_reference: Optional[str] = None  # an earlier slot to measure eval/kl against; None: the stage's start
    # keep the judge: each step adds judge_weight x the NLL of judge_batch_size of the task's
    # judging examples (the seed EFT data SFT saw), so judging is not forgotten while DPO moves
    # the policy; 0: off
    judge_batch_size: int = 0
    judge_weight: float = 1.0
    # where the replayed judging examples come from: "task" (the task's own, as in SFT) or
    # "own" (the round's own candidates, half right and half wrong where the round has both,
    # each with the verdict the task's verifier gives it: EFT data from the mistakes the
    # model makes now; the verifier labels the judge's training data, never the pairs)
    judge_examples: str = "task"

    def __post_init__(self):
        if self.judge_examples not in ("task", "own"):
            raise ConfigError(f"judge_examples={self.judge_examples!r}: use 'task' or 'own'")
        if self.steps_per_round < 1 or self.num_candidates < 2:
            raise ConfigError(f"steps_per_round must be >= 1 and num_candidates >= 2, got {self.steps_per_round} and {self.num_candidates}")


def select_pair(responses: Sequence[str], scores: Sequence[Optional[float]], min_gap: float = 0.0) -> dict:
    """The best-over-worst pair of one prompt's candidates, or why there is none.

    Identical responses are one response (their scores averaged), so a pair never pits a
    text against itself. Returns {"status": "pair" | "tie" | "unparseable", "chosen",
    "rejected", "chosen_score", "rejected_score"}; the first of equal scores wins either
    way. "unparseable": fewer than two candidates have a score. "tie": best - worst <=
    min_gap, or every scored candidate is the same text.
    """
    merged: dict[str, list[float]] = {}
    for response, score in zip(responses, scores):
        if score is not None and math.isfinite(score):
            merged.setdefault(response, []).append(score)
    out = {"status": "unparseable", "chosen": None, "rejected": None, "chosen_score": None, "rejected_score": None}
    if sum(len(v) for v in merged.values()) < 2:
        return out
    if len(merged) < 2:
        out["status"] = "tie"
        return out
    means = [(sum(v) / len(v), text) for text, v in merged.items()]
    best = max(means, key=lambda x: x[0])
    worst = min(means, key=lambda x: x[0])
    if best[0] - worst[0] <= min_gap:
        out["status"] = "tie"
        return out
    out.update(status="pair", chosen=best[1], rejected=worst[1], chosen_score=best[0], rejected_score=worst[0])
    return out


def no_pair_cause(rows: list[dict]) -> str:
    """Why these rows made no pair: the judge's verdicts that did not parse (with one raw
    judgement), or candidates that all tied."""
    samples = [(s, t) for row in rows for c in row["candidates"] for s, t in zip(c["judge_scores"], c["judgements"])]
    failed = [t for s, t in samples if s is None]
    ties = sum(row["status"] == "tie" for row in rows)
    if failed and len(failed) >= len(samples) / 2:
        return (
            f"the judge's verdicts did not parse ({len(failed)} of {len(samples)}; one raw judgement: {failed[0][:200]!r}); "
            "check the judge's template and score pattern, or train the judge first (recipe=self_reward_eft)"
        )
    return f"the candidates of {ties} of {len(rows)} prompts tied; raise num_candidates or temperature, or lower min_score_gap"


def round_stats(rows: list[dict]) -> dict[str, float]:
    candidates = [c for row in rows for c in row["candidates"]]
    judge_samples = [s for c in candidates for s in c["judge_scores"]]
    count = {s: float(sum(row["status"] == s for row in rows)) for s in ("pair", "tie", "unparseable")}
    stats = {
        "round/prompts": float(len(rows)),
        "round/pairs": count["pair"],
        "round/ties": count["tie"],
        "round/unparseable": count["unparseable"],
        "round/judge_parse_failure_rate": sum(s is None for s in judge_samples) / max(1, len(judge_samples)),
        "round/mean_response_length": sum(len(c["response"]) for c in candidates) / max(1, len(candidates)),
    }
    scored = [c["score"] for c in candidates if c["score"] is not None]
    if scored:
        stats["round/mean_judge_score"] = sum(scored) / len(scored)
    truth = [c["verifier"] for c in candidates]
    if truth and all(t is not None for t in truth):
        stats["round/mean_verifier_score"] = sum(truth) / len(truth)
        pairs = [row for row in rows if row["status"] == "pair"]
        if pairs:  # is the judge's chosen response really better? (diagnostic only, never trained on)
            gaps = [row["chosen_verifier"] - row["rejected_verifier"] for row in pairs]
            stats["round/pair_verifier_gap"] = sum(gaps) / len(gaps)
            decided = [g for g in gaps if g != 0]
            if decided:
                stats["round/pair_accuracy"] = sum(g > 0 for g in decided) / len(decided)
    return stats


class SelfRewardModule(L.LightningModule):
    def __init__(self, ctx: StageContext, reference: Optional[torch.nn.Module]):
        super().__init__()
        self.policy, self.cfg, self.ctx = ctx.policy, ctx.cfg, ctx
        object.__setattr__(self, "reference", reference)  # not a submodule: out of optimizer, DDP, checkpoints
        self.round = -1
        self.data: Optional[RoundPairs] = None
        self.rows: list[dict] = []  # the round file's rows (judge_examples=own draws from them)
        self.recent: deque = deque(maxlen=20)
        self.recent_judge_nll: deque = deque(maxlen=20)
        self.last_round: dict[str, float] = {}

    def on_train_start(self):
        if self.reference is not None:
            self.reference.to(self.device)

    def on_train_batch_start(self, batch, batch_idx):
        r = int(batch[0])
        if r != self.round:
            self._start_round(r)

    def _start_round(self, r: int) -> None:
        rows, reloaded = load_or_make(round_path(self.ctx.stage_dir, r), lambda: new_round_rows(self, r, self._make_rows, self.cfg.eval_prompts), self.trainer.is_global_zero)
        if reloaded:  # resumed mid-round: the weights are no longer the round's start
            log.info("%s round %d: reloaded", self.ctx.slot, r)
        self.rows = rows
        self.data = RoundPairs.best_vs_worst(rows, needs_reference(self.cfg), self.ctx.tokenizer, self.ctx.policy.max_seq_len, self.ctx.seed, r)
        if self.data.empty:
            log.warning("%s round %d: no pair at all, its steps train nothing: %s", self.ctx.slot, r, no_pair_cause(rows))
        self.round = r
        stats = round_stats(rows)
        self.last_round.update(stats)
        log_now(self, stats)
        log.info("%s round %d: %s", self.ctx.slot, r, {k: round(v, 4) for k, v in stats.items()})

    def _make_rows(self, r: int) -> list[dict]:
        """Sample, judge and pair this rank's share of round r's prompts; gather every rank's rows."""
        cfg, task, tok = self.cfg, self.ctx.task, self.ctx.tokenizer
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rng = random.Random(mix_seed(self.ctx.seed, "prompts", r))
        prompts = [task.train_prompt(rng) for _ in range(cfg.batch_size * cfg.steps_per_round)]
        mine = list(range(len(prompts)))[rank::world]
        k = cfg.num_candidates
        repeated = [prompts[i] for i in mine for _ in range(k)]
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(self.ctx.seed, "sample", r, rank))
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        # sharded: every rank gathers the whole weights once for the round to answer and judge with
        # (a sharded model would all-gather every layer at every decoding step, in lockstep)
        sampler = gather_policy(self.policy, self.ctx.new_policy)
        responses, finished = generate_responses(sampler, tok, repeated, sampling, cfg.generation_batch_size, generator)
        judged = judge(sampler, tok, repeated, responses, cfg.judge, generator, cfg.generation_batch_size)
        rows = []
        for j, i in enumerate(mine):
            sl = slice(j * k, (j + 1) * k)
            candidates = [
                {"response": resp, "finished": done, "judgements": jd.texts, "judge_references": jd.references, "judge_scores": jd.scores, "score": jd.score, "verifier": task.score(prompts[i], resp)}
                for resp, done, jd in zip(responses[sl], finished[sl], judged[sl])
            ]
            row = {"index": i, "round": r, "prompt": prompts[i], "candidates": candidates}
            row.update(select_pair([c["response"] for c in candidates], [c["score"] for c in candidates], cfg.min_score_gap))
            mark_finished(row, candidates)
            if row["status"] == "pair":
                truth = {c["response"]: c["verifier"] for c in candidates}
                row["chosen_verifier"], row["rejected_verifier"] = truth[row["chosen"]], truth[row["rejected"]]
            rows.append(row)
        if self.reference is not None:
            attach_reference(rows, self.reference, tok, self.ctx.policy.max_seq_len, 4 * cfg.batch_size, self.device)
        return gather_rows(rows, world)

    def configure_model(self):
        shard_in(self, self.policy)  # trainer.strategy=fsdp (rlhf/models/fsdp.py)

    def training_step(self, batch, batch_idx):
        loss = round_training_step(self, batch, lambda tokens, mask, ref: preference_loss(self.cfg, *pair_logprobs(self.policy, tokens, mask), ref))
        if self.cfg.judge_batch_size:
            judge_nll = self._judge_nll(int(batch[0]), int(batch[1]))
            self.log("train/judge_nll", judge_nll)
            self.recent_judge_nll.append(float(judge_nll.detach()))
            loss = loss + self.cfg.judge_weight * judge_nll
            check_finite(loss, self.ctx.slot, self.global_step)
        return loss

    def _judge_nll(self, r: int, step: int) -> torch.Tensor:
        """NLL of this rank's share of the judging examples of round r's step (a pure function of (seed, r, step))."""
        rng = random.Random(mix_seed(self.ctx.seed, "judge_examples", r, step))
        template, tok = self.cfg.judge.resolved_template(), self.ctx.tokenizer
        if self.cfg.judge_examples == "own":
            examples = own_judging_examples(self.ctx.task, self.rows, self.cfg.judge_batch_size, rng, template)
        else:
            examples = [self.ctx.task.judge_example(rng, template) for _ in range(self.cfg.judge_batch_size)]
        mine = examples[self.trainer.global_rank :: self.trainer.world_size]
        tokens, mask = encode_examples(tok, mine, self.device)
        return response_nll(self.policy(tokens), tokens, mask)

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.cfg)

    def final_metrics(self) -> dict[str, float]:
        judge = {"train/judge_nll": sum(self.recent_judge_nll) / len(self.recent_judge_nll)} if self.recent_judge_nll else {}
        return {**recent_means(self.recent), **judge, **self.last_round}


@torch.no_grad()
def kl_estimate(policy, reference, tokenizer, prompts: list[str], max_new_tokens: int, generator, batch_size: int) -> float:
    """Mean over responses sampled from the policy itself (temperature 1, no filter) of
    sum(log pi - log pi_ref): an unbiased estimate of KL(pi || pi_ref) per response."""
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    total = 0.0
    for start in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        gen = generate(policy, ids, sampling, tokenizer.eos_id, tokenizer.pad_id, generator)
        tokens, mask = join_prompt_response(ids, gen.response_ids(), tokenizer.pad_id, device)
        total += float((sequence_logprobs(policy(tokens), tokens, mask) - sequence_logprobs(reference(tokens), tokens, mask)).sum())
    policy.train(was_training)
    return total / max(1, len(prompts))


def measure(ctx: StageContext, kl_reference: Optional[torch.nn.Module], name: str, policy: Optional[torch.nn.Module] = None) -> dict[str, float]:
    """Judge agreement (and KL when a reference is given) of `policy` (default: the stage's
    current policy) on held-out prompts.

    Writes every held-out candidate and judgement to `<stage_dir>/judge_eval_<name>.jsonl`."""
    cfg = ctx.cfg
    policy = ctx.policy if policy is None else policy
    prompts = ctx.task.eval_prompts()[: cfg.eval_prompts]
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(mix_seed(ctx.seed, "judge_eval"))
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    metrics, rows = evaluate_judge(policy, ctx.tokenizer, ctx.task, prompts, cfg.num_candidates, sampling, cfg.judge, generator, cfg.generation_batch_size)
    files.write_jsonl(Path(ctx.stage_dir) / f"judge_eval_{name}.jsonl", rows)
    if kl_reference is not None:
        kl_reference.to(device)
        metrics["eval/kl"] = kl_estimate(policy, kl_reference, ctx.tokenizer, prompts * 2, cfg.max_new_tokens, generator, cfg.generation_batch_size)
    return metrics


def write_flat_files(stage_dir: Path) -> dict[str, float]:
    """All rounds' candidates (with their judgements) and pairs as flat JSONL, the pairs ready
    for the `dpo` stage's `data`; returns the stage's totals (read from every round's file, so
    a resumed stage counts the rounds it did before the crash too)."""
    candidates, pairs = [], []
    totals = {"pairs_total": 0.0, "ties_total": 0.0, "unparseable_total": 0.0}
    for row in all_round_rows(stage_dir):
            totals[f"{row['status']}s_total" if row["status"] != "unparseable" else "unparseable_total"] += 1
            for c in row["candidates"]:
                candidates.append({"round": row["round"], "prompt": row["prompt"], **c})
            if row["status"] == "pair":
                pairs.append({k: row[k] for k in ("round", "prompt", "chosen", "rejected", "chosen_score", "rejected_score")})
    files.write_jsonl(stage_dir / "candidates.jsonl", candidates)
    files.write_jsonl(stage_dir / "pairs.jsonl", pairs)
    return totals


# read by rlhf.config when the run's config is read, so a wrong loss setting fails before any stage trains
check_config = check_loss_config


def run(ctx: StageContext) -> StageResult:
    cfg, tok = ctx.cfg, ctx.tokenizer
    check_loss_config(cfg, ctx.slot)
    if not hasattr(ctx.task, "train_prompt"):
        raise ConfigError(f"stages.{ctx.slot}: task {ctx.run_cfg.task.name!r} has no training prompts to sample from")
    try:  # the template's characters must be ones the tokenizer knows
        tok.encode(cfg.judge.resolved_template().format(prompt="", response="", reference=""))
    except DataError as err:
        raise ConfigError(f"stages.{ctx.slot}.judge template: {err}") from None
    if cfg.judge_batch_size and not hasattr(ctx.task, "judge_example" if cfg.judge_examples == "task" else "judging_example"):
        raise ConfigError(f"stages.{ctx.slot}.judge_batch_size: task {ctx.run_cfg.task.name!r} has no judging examples; set it to 0")
    if cfg.judge_batch_size and "reference" in template_fields(cfg.judge.resolved_template()):
        raise ConfigError(f"stages.{ctx.slot}.judge_batch_size: judging examples have no {{reference}} answer to fill the template with; set it to 0")
    kl_slot_dir = ctx.stage_dir_of(cfg.kl_reference) if cfg.kl_reference else None  # fails now if the slot is not earlier

    start = starting_reference(ctx)  # the iteration's starting weights, frozen (LoRA-aware)
    kl_ref = start
    if kl_slot_dir is not None:
        kl_ref = ctx.new_model()
        load_weights(kl_ref, kl_slot_dir / "policy.safetensors")
        kl_ref.requires_grad_(False).eval()
    metrics: dict[str, float] = {}
    if cfg.eval_prompts and ctx.is_global_zero:
        cached = Path(ctx.stage_dir) / "start_eval.json"  # a resumed stage does not measure its start again
        if cached.exists():
            start_metrics = files.read_json(cached)
        else:
            start_metrics = measure(ctx, None, "start")
            files.write_json(cached, start_metrics)
        metrics.update({k.replace("eval/", "start/", 1): v for k, v in start_metrics.items()})
        log.info("%s start: %s", ctx.slot, {k: round(v, 4) for k, v in start_metrics.items()})

    module = SelfRewardModule(ctx, start if needs_reference(cfg) else None)
    ctx.fit(module, round_batches(cfg.steps_per_round * cfg.accumulate_grad_batches))
    metrics.update(module.final_metrics())
    rows = all_round_rows(ctx.stage_dir)  # every rank: all of them raise, none waits for the others
    if not any(row["status"] == "pair" for row in rows):  # the stage trained on nothing: never mark it complete
        raise DataError(f"stages.{ctx.slot}: no usable pair in any round, nothing was trained: {no_pair_cause(rows)}")
    # sharded: the end measurement (rank 0 alone) needs the whole weights, gathered by every rank
    whole = gather_policy(ctx.policy, ctx.new_policy) if cfg.eval_prompts else None
    if ctx.is_global_zero:
        metrics.update(write_flat_files(Path(ctx.stage_dir)))
        if cfg.eval_prompts:
            end = measure(ctx, kl_ref, "end", whole)
            metrics.update(end)
            if ctx.logger is not None:
                ctx.logger.log_metrics({**end, **{k: v for k, v in metrics.items() if k.startswith("start/")}})
            log.info("%s end: %s", ctx.slot, {k: round(v, 4) for k, v in end.items()})
    return StageResult(ctx.policy, metrics)
