"""Reward-model training: a head on an LM trunk, read at the last response token (rlhf.reward.RewardModel).

Two kinds of data and loss:

- pairs (`num_bins: 1`): Bradley-Terry, `-log sigmoid(r(chosen) - r(rejected))`. Chosen and
  rejected rows go through the model as ONE batch (chosen first), so padding and batch
  statistics treat them alike.
- ratings (`num_bins > 1`, `data_format: ratings`): cross entropy over rating bins, the reward is
  the expected bin value in [0, 1] (PaLM-rlhf's `num_binned_output`). Stars 1-5 need 5 bins,
  thumbs up/down 2.

Data: `data` JSONL files (pairs, including hh-rlhf transcripts, or ratings; see rlhf.data.jsonl)
with `valid_data` or a seeded `valid_fraction` split held out; or, with `data: null`, the
built-in task, whose verifier ranks three kinds of pairs: two near misses (`graded_fraction`;
so the reward learns graded quality, not only "exact or not"), optionally two samples of the
incoming policy (`policy_fraction`; what later stages will ask the reward model to rank), and
the rest (correct answer, near miss) from `task.preference_pair`. Ratings there are verifier
scores put in bins.

Long examples (hh-rlhf transcripts run to thousands of tokens) are cut to `max_len` tokens:
the response keeps its START (at least half of `max_len`, more if the prompt is short), the
prompt keeps its END (the turn being answered), and an EOS closes every row, so the head
always reads the same kind of token. `max_len` is saved with the model, and
`rlhf.reward.model_reward_fn` cuts rows the same way when later stages score with it.

The trunk starts from the incoming policy's weights (`init: policy`) or from scratch; the
policy itself is returned unchanged. Artifacts: `reward_model.safetensors`, `reward_model.yaml`
(later stages load them by slot with `rlhf.reward.reward_function(ctx, None, slot)`).
Metrics: `eval/pair_accuracy` and `eval/reward_margin` on held-out pairs; for ratings also
`eval/rating_accuracy` (pair accuracy then counts every two held-out responses with different
ratings); on the built-in task also `eval/verifier_agreement` (pairs of near misses with
different verifier scores ranked in the verifier's order), `eval/verifier_correlation`
(Spearman between reward and verifier score) and, on samples of the policy itself,
`eval/policy_sample_agreement`, `eval/best_of_k_score` and `eval/sample_score`.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch

from rlhf.config import StageConfig
from rlhf.data.token_store import TokenStore, store_rows
from rlhf.errors import ConfigError
from rlhf.losses.preference import binned_rating_loss, bradley_terry_loss, expected_rating, preference_accuracy, reward_centering_penalty
from rlhf.models import base_state_dict, gather_policy, shard_in
from rlhf.reward import RewardModel, save_reward_model, truncate
from rlhf.sampling import join_prompt_response
from rlhf.stage_context import StageContext, StageResult
from rlhf.tasks.builtin import answer
from rlhf.training import EpochSampler, adamw_with_schedule, check_finite, mix_seed, step_rng

KIND = "reward_model"


@dataclass
class Config(StageConfig):
    kind: str = KIND
    max_steps: int = 300
    batch_size: int = 32  # pairs (or rated responses) per optimizer step
    lr: float = 3e-4
    init: str = "policy"  # policy: the trunk starts from the incoming policy | scratch
    data: Optional[Any] = None  # JSONL path, glob or list; None uses the built-in task
    data_format: str = "pairs"  # pairs | ratings
    valid_data: Optional[Any] = None  # held-out files; None splits valid_fraction off `data`
    valid_fraction: float = 0.1
    split_seed: int = 0  # fixes the split whatever the run's seed, so runs compare on one held-out set
    num_bins: int = 1  # 1: scalar Bradley-Terry reward; > 1: rating bins (needs ratings)
    # pairs: + this x mean((r_chosen + r_rejected)^2), rewards centred near 0 for every prompt
    # (TRL's name; Eisenstein et al. 2023 use 0.01)
    center_rewards_coefficient: float = 0.0
    skip_bad_rows: bool = False
    max_len: int = 256  # tokens per row, prompt + response + EOS (see the module docstring)
    eval_batch_size: int = 64
    # built-in task (data: null): where pairs come from
    # (policy pairs did not help at 300 steps: docs/results_reward_model.md; hence 0 by default)
    policy_fraction: float = 0.0  # share of pairs that are two samples of the incoming policy ranked by the verifier
    graded_fraction: float = 0.5  # share that are two near misses ranked by the verifier; the rest: answer vs near miss
    max_edits: int = 4  # a near miss has 1..max_edits corruptions
    policy_pool: int = 512  # training prompts the policy answers once, at the start, for its pairs
    policy_samples: int = 4  # samples per prompt, for that pool and the on-policy evaluation (0: no policy samples)


Item = tuple[list[int], list[int]]  # (prompt ids, response ids without EOS)


# ----------------------------------------------------------------------------- rows


def encode_rows(items: list[Item], tok, max_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens and response masks, every response closed by EOS."""
    cut = [truncate(p, r, max_len) for p, r in items]
    return join_prompt_response([p for p, _ in cut], [r + [tok.eos_id] for _, r in cut], tok.pad_id, device)


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]


# ----------------------------------------------------------------------------- built-in task


def near_miss(task, prompt: str, correct: str, rng: random.Random, max_edits: int) -> str:
    """The correct response with 1..max_edits of the task's small-model mistakes applied."""
    response = correct
    for _ in range(rng.randint(1, max_edits)):
        response = task.corrupt(prompt, response, rng)
    return response


def graded_pair(task, prompt: str, correct: str, rng: random.Random, max_edits: int) -> tuple[str, str]:
    """Two near misses with different verifier scores, the better one first."""
    for _ in range(20):
        a, b = (near_miss(task, prompt, correct, rng, max_edits) for _ in range(2))
        sa, sb = task.score(prompt, a), task.score(prompt, b)
        if sa != sb:
            return (a, b) if sa > sb else (b, a)
    return correct, near_miss(task, prompt, correct, rng, max_edits)


def rating_bin(score: float, num_bins: int) -> int:
    return min(num_bins - 1, int(round(score * (num_bins - 1))))


def builtin_row(task, tok, cfg: Config, rng: random.Random, pool: list[tuple[str, str, float]]) -> tuple[list[int], list[int], Any]:
    """One training row: (prompt, chosen, rejected) ids for pairs, (prompt, response, bin) for ratings.

    `pool`: the policy's own (prompt, response, verifier score) samples, grouped by prompt.
    """
    draw = rng.random()
    if cfg.data_format == "ratings":
        if draw < cfg.policy_fraction and pool:
            prompt, response, score = rng.choice(pool)
        else:
            prompt = task.train_prompt(rng)
            a = answer(prompt)
            response = a if rng.random() < 1 / (cfg.max_edits + 1) else near_miss(task, prompt, a, rng, cfg.max_edits)
            score = task.score(prompt, response)
        return tok.encode(prompt), tok.encode(response), rating_bin(score, cfg.num_bins)
    pair = policy_pair(pool, cfg.policy_samples, rng) if draw < cfg.policy_fraction else None
    if pair is not None:
        prompt, chosen, rejected = pair
    elif draw < cfg.policy_fraction + cfg.graded_fraction:
        prompt = task.train_prompt(rng)
        chosen, rejected = graded_pair(task, prompt, answer(prompt), rng, cfg.max_edits)
    else:
        pair = task.preference_pair(rng)
        prompt, chosen, rejected = pair.prompt, pair.chosen, pair.rejected
    return tok.encode(prompt), tok.encode(chosen), tok.encode(rejected)


def policy_pair(pool: list[tuple[str, str, float]], k: int, rng: random.Random) -> Optional[tuple[str, str, str]]:
    """Two of one prompt's k policy samples with different verifier scores, the better first (None: none found)."""
    for _ in range(20):
        start = rng.randrange(len(pool) // k) * k if pool else 0
        group = pool[start : start + k]
        if len(group) < 2:
            return None
        (p, a, sa), (_, b, sb) = rng.sample(group, 2)
        if sa != sb:
            return (p, a, b) if sa > sb else (p, b, a)
    return None


@torch.no_grad()
def sample_policy(ctx: StageContext, prompts: list[str], k: int, seed: int) -> list[tuple[str, str, float]]:
    """(prompt, response, verifier score) for k samples (temperature 1) of the incoming policy per prompt."""
    from rlhf.sampling import generate_text
    from rlhf.sampling import SamplingConfig

    rows = [p for p in prompts for _ in range(k)]
    sampling = SamplingConfig(max_new_tokens=ctx.run_cfg.eval.max_new_tokens, temperature=1.0)
    generator = torch.Generator(device=next(ctx.policy.parameters()).device).manual_seed(seed)
    responses = generate_text(ctx.policy, ctx.tokenizer, rows, sampling, ctx.run_cfg.eval.batch_size, generator=generator)
    return [(p, r, ctx.task.score(p, r)) for p, r in zip(rows, responses)]


def builtin_candidates(task, prompts: list[str], seed: int, max_edits: int) -> list[tuple[str, list[str], list[float]]]:
    """Held-out: per prompt the answer, one single-edit near miss and two deeper near misses, with verifier scores."""
    rng = random.Random(seed)
    out = []
    for p in prompts:
        a = answer(p)
        responses = [a, task.corrupt(p, a, rng)] + [near_miss(task, p, a, rng, max_edits) for _ in range(2)]
        out.append((p, responses, [task.score(p, r) for r in responses]))
    return out


# ----------------------------------------------------------------------------- training


class RewardModule(L.LightningModule):
    """Bradley-Terry on [chosen; rejected] batches, or rating-bin cross entropy on labelled ones."""

    def __init__(self, model: RewardModel, stage_cfg: Config, slot: str):
        super().__init__()
        self.model, self.stage_cfg, self.slot = model, stage_cfg, slot

    def configure_model(self):
        shard_in(self, self.model)  # trainer.strategy=fsdp (rlhf/models/fsdp.py)

    def training_step(self, batch, batch_idx):
        if "labels" in batch:
            logits = self.model.logits(batch["tokens"], batch["mask"])
            loss = binned_rating_loss(logits, batch["labels"])
            self.log("train/rating_accuracy", (logits.argmax(-1) == batch["labels"]).float().mean())
        else:
            chosen, rejected = self.model(batch["tokens"], batch["mask"]).chunk(2)
            loss = bradley_terry_loss(chosen, rejected)
            if self.stage_cfg.center_rewards_coefficient:
                loss = loss + self.stage_cfg.center_rewards_coefficient * reward_centering_penalty(chosen, rejected)
            self.log("train/pair_accuracy", preference_accuracy(chosen, rejected))
            self.log("train/reward_margin", (chosen - rejected).mean())
        check_finite(loss, self.slot, self.global_step)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return adamw_with_schedule(self.model.parameters(), self.stage_cfg)


def freeze_unused(model: RewardModel, tokens: torch.Tensor, mask: torch.Tensor) -> None:
    """Freeze parameters the reward never reaches (the trunk's LM output layer).

    DDP fails on trainable parameters without a gradient, and AdamW would spend time on them.
    """
    model.zero_grad(set_to_none=True)
    model(tokens, mask).sum().backward()
    for p in model.parameters():
        if p.grad is None:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def rewards_of(model: RewardModel, items: list[Item], tok, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (N,), head logits (N, num_bins)) for (prompt ids, response ids) items."""
    model.eval()
    device = next(model.parameters()).device
    rewards, logits = [], []
    for i in range(0, len(items), cfg.eval_batch_size):
        tokens, mask = encode_rows(items[i : i + cfg.eval_batch_size], tok, cfg.max_len, device)
        out = model.logits(tokens, mask).float()
        logits.append(out.cpu())
        rewards.append((out.squeeze(-1) if model.num_bins == 1 else expected_rating(out)).cpu())
    return torch.cat(rewards), torch.cat(logits)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when either side is constant."""

    def ranks(v: torch.Tensor) -> torch.Tensor:
        order = v.argsort()
        r = torch.empty_like(v, dtype=torch.float64)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x.double()), ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / denom) if denom > 0 else 0.0


def verifier_agreement(rewards: torch.Tensor, scores: torch.Tensor) -> Optional[float]:
    """Over the pairs of columns of each row (one prompt's responses) whose verifier scores differ:
    the fraction the reward orders the same way (a reward tie counts as wrong; None if no pair differs)."""
    agree, total = 0, 0
    for i in range(scores.shape[1]):
        for j in range(i + 1, scores.shape[1]):
            differ = scores[:, i] != scores[:, j]
            same_order = (scores[:, i] > scores[:, j]) == (rewards[:, i] > rewards[:, j])
            agree += int((differ & same_order & (rewards[:, i] != rewards[:, j])).sum())
            total += int(differ.sum())
    return agree / total if total else None


def ordered_pairs_metrics(rewards: torch.Tensor, values: torch.Tensor) -> dict[str, float]:
    """Over every two items with different values: how often reward orders them like the values."""
    higher = values[:, None] > values[None, :]
    margin = (rewards[:, None] - rewards[None, :])[higher]
    if margin.numel() == 0:
        return {}
    return {"eval/pair_accuracy": (margin > 0).float().mean().item(), "eval/reward_margin": margin.mean().item()}


# ----------------------------------------------------------------------------- the stage


def _check(cfg: Config) -> None:
    if cfg.init not in ("policy", "scratch"):
        raise ConfigError(f"init={cfg.init!r} is not one of: policy, scratch")
    if cfg.data_format not in ("pairs", "ratings"):
        raise ConfigError(f"data_format={cfg.data_format!r} is not one of: pairs, ratings")
    if cfg.data_format == "pairs" and cfg.num_bins != 1:
        raise ConfigError(f"num_bins={cfg.num_bins} needs data_format=ratings (pairs train a scalar reward: num_bins=1)")
    if cfg.data_format == "ratings" and cfg.num_bins < 2:
        raise ConfigError("data_format=ratings needs num_bins >= 2 (5 for 1-5 stars, 2 for thumbs up/down)")
    if not (0 <= cfg.policy_fraction and 0 <= cfg.graded_fraction and cfg.policy_fraction + cfg.graded_fraction <= 1):
        raise ConfigError("policy_fraction and graded_fraction must be >= 0 with a sum <= 1")
    if cfg.max_len < 4:
        raise ConfigError(f"max_len={cfg.max_len} is too short")
    if cfg.center_rewards_coefficient < 0:
        raise ConfigError(f"center_rewards_coefficient={cfg.center_rewards_coefficient} must be >= 0")


def check_config(cfg: Config, slot: str) -> None:
    """The orchestrator's check before any stage trains: one ConfigError naming the key."""
    try:
        _check(cfg)
    except ConfigError as err:
        raise ConfigError(f"stages.{slot}: {err}") from None


def read_file_data(cfg: Config, tok, metrics: dict[str, float], keep=None) -> tuple[TokenStore, TokenStore]:
    """Encoded (train, valid) rows from `data` (and `valid_data`): (prompt, chosen, rejected) or (prompt, response, label).

    `keep` (the stage context's `iter_training_rows`) filters the rows of `data` before they are
    split: a prompt the task holds out for evaluating the policy is neither trained on nor used
    to validate the reward model. `valid_data` is read whole.

    Each is a TokenStore (rlhf.data.token_store) whose row i is that tuple of id lists: rows are
    encoded as they stream in, so neither the text nor lists of ints are ever all resident
    (issue #17 item 9: 100k pairs took ~28x their encoded size as lists)."""
    from rlhf.data.chat import renderer_for
    from rlhf.data.jsonl import split_train_valid, stream_preference_pairs, stream_ratings

    ratings = cfg.data_format == "ratings"
    keys = ("prompt", "response") if ratings else ("prompt", "chosen", "rejected")

    def encode(chunk):
        ids = _ids(tok, [getattr(x, k) for x in chunk for k in keys])
        return [ids[i * len(keys) : (i + 1) * len(keys)] for i in range(len(chunk))]

    def read(spec, keep=lambda rows: rows):
        stats: dict = {}
        levels: list[int] = []  # the first rating's scale (the reader checks that all rows agree)

        def label(x):
            if not levels:
                levels.append(x.num_levels)
            return x.label

        rows = (stream_ratings if ratings else stream_preference_pairs)(spec, skip_bad_rows=cfg.skip_bad_rows, stats=stats, chat=renderer_for(tok))
        store = store_rows(keep(rows), encode, len(keys), label=label if ratings else None)
        metrics["data/skipped_rows"] = metrics.get("data/skipped_rows", 0.0) + stats["skipped"]
        if ratings and levels[0] != cfg.num_bins:
            raise ConfigError(f"{spec}: the ratings have {levels[0]} levels but num_bins={cfg.num_bins}")
        return store

    train = read(cfg.data, keep or (lambda rows: rows))
    if cfg.valid_data is not None:
        valid = read(cfg.valid_data)
    else:
        # the same seeded split as of the rows themselves, as row numbers: the store is not copied
        train_rows, valid_rows = split_train_valid(range(len(train)), cfg.valid_fraction, cfg.split_seed)
        train, valid = train.subset(train_rows), train.subset(valid_rows)
    metrics["data/train_rows"], metrics["data/valid_rows"] = float(len(train)), float(len(valid))
    return train, valid


def evaluate_file_data(model: RewardModel, tok, cfg: Config, valid: TokenStore) -> dict[str, float]:
    if not valid:
        return {}
    if cfg.data_format == "pairs":
        rewards, _ = rewards_of(model, [(p, c) for p, c, _ in valid] + [(p, r) for p, _, r in valid], tok, cfg)
        chosen, rejected = rewards.chunk(2)
        return {"eval/pair_accuracy": preference_accuracy(chosen, rejected).item(), "eval/reward_margin": (chosen - rejected).mean().item()}
    rewards, logits = rewards_of(model, [(p, r) for p, r, _ in valid], tok, cfg)
    labels = torch.tensor([label for _, _, label in valid])
    # every two held-out responses with different ratings; the first 2000 rows bound the N^2 pairs
    metrics = ordered_pairs_metrics(rewards[:2000], labels[:2000].double())
    metrics["eval/rating_accuracy"] = (logits.argmax(-1) == labels).float().mean().item()
    return metrics


def run(ctx: StageContext) -> StageResult:
    cfg, task, tok = ctx.cfg, ctx.task, ctx.tokenizer
    check_config(cfg, ctx.slot)
    ratings = cfg.data_format == "ratings"
    metrics: dict[str, float] = {}

    if cfg.data is not None:
        train, valid = read_file_data(cfg, tok, metrics, keep=ctx.iter_training_rows)
        sampler = EpochSampler(len(train), cfg.batch_size, ctx.seed)
        draw = lambda step: [train[i] for i in sampler.batch(step)]  # noqa: E731
    else:
        if not hasattr(task, "preference_pair"):
            raise ConfigError(f"stages.{ctx.slot}: data=null uses the built-in task, but task.name={ctx.run_cfg.task.name}; give data=PATH")
        # held-out prompts never appear in training (task.train_prompt excludes them)
        held_out = builtin_candidates(task, task.eval_prompts(), mix_seed(ctx.seed, "held-out"), cfg.max_edits)
        pool: list[tuple[str, str, float]] = []
        if cfg.policy_fraction > 0 and cfg.policy_samples > 1:
            # sampled once, from a fixed policy and seed: a resumed stage rebuilds the same pool
            rng = random.Random(mix_seed(ctx.seed, "pool"))
            pool = sample_policy(ctx, [task.train_prompt(rng) for _ in range(cfg.policy_pool)], cfg.policy_samples, mix_seed(ctx.seed, "pool"))

        def draw(step):
            rng = step_rng(ctx.seed, step)
            return [builtin_row(task, tok, cfg, rng, pool) for _ in range(cfg.batch_size)]

    def make_batch(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        shard = draw(step)[rank::world]
        if ratings:
            tokens, mask = encode_rows([(p, r) for p, r, _ in shard], tok, cfg.max_len)
            return {"tokens": tokens, "mask": mask, "labels": torch.tensor([label for _, _, label in shard])}
        rows = [(p, c) for p, c, _ in shard] + [(p, r) for p, _, r in shard]  # chosen first, then rejected
        tokens, mask = encode_rows(rows, tok, cfg.max_len)
        return {"tokens": tokens, "mask": mask}

    trunk = ctx.new_model()
    if cfg.init == "policy":
        trunk.load_state_dict(base_state_dict(ctx.policy))  # a copy: the policy itself is not trained
    model = RewardModel(trunk, num_bins=cfg.num_bins, max_len=cfg.max_len)
    probe = make_batch(0, 0, 1)
    freeze_unused(model, probe["tokens"][:2], probe["mask"][:2])
    module = RewardModule(model, cfg, ctx.slot)
    ctx.fit(module, make_batch)
    # trainer.strategy=fsdp: every rank gathers the whole weights (a collective); otherwise the model itself
    model = gather_policy(module.model, lambda: RewardModel(ctx.new_model(), num_bins=cfg.num_bins, max_len=cfg.max_len))
    if ctx.is_global_zero:
        save_reward_model(model, ctx.stage_dir)
        if cfg.data is not None:
            metrics.update(evaluate_file_data(model, tok, cfg, valid))
        else:
            metrics.update(evaluate_builtin(model, tok, cfg, held_out))
            if cfg.policy_samples > 1:
                metrics.update(evaluate_on_policy_samples(model, ctx, [p for p, _, _ in held_out]))
    return StageResult(ctx.policy, metrics)


def evaluate_builtin(model: RewardModel, tok, cfg: Config, candidates) -> dict[str, float]:
    """Pair accuracy (answer vs near misses), verifier agreement (near miss vs near miss), correlation."""
    items = [(tok.encode(p), tok.encode(r)) for p, responses, _ in candidates for r in responses]
    rewards, logits = rewards_of(model, items, tok, cfg)
    per = len(candidates[0][1])
    rewards = rewards.view(-1, per)
    scores = torch.tensor([s for _, _, scores in candidates for s in scores], dtype=torch.float64).view(-1, per)
    margins = rewards[:, :1] - rewards[:, 1:]  # the answer (column 0) over each near miss
    metrics = {
        "eval/pair_accuracy": (margins > 0).float().mean().item(),
        "eval/reward_margin": margins.mean().item(),
        "eval/verifier_agreement": verifier_agreement(rewards[:, 1:], scores[:, 1:]) or 0.0,
        "eval/verifier_correlation": spearman(rewards.flatten(), scores.flatten().float()),
    }
    if model.num_bins > 1:
        labels = torch.tensor([rating_bin(float(s), model.num_bins) for s in scores.flatten()])
        metrics["eval/rating_accuracy"] = (logits.argmax(-1) == labels).float().mean().item()
    return metrics


@torch.no_grad()
def evaluate_on_policy_samples(model: RewardModel, ctx: StageContext, prompts: list[str]) -> dict[str, float]:
    """The reward model on what the policy really writes: K samples per held-out prompt.

    `eval/policy_sample_agreement`: pairs of samples with different verifier scores ranked in
    the verifier's order; `eval/best_of_k_score` vs `eval/sample_score`: the verifier score of
    the sample the reward model picks, against a random sample's (best-of-K gain).
    """
    tok, k = ctx.tokenizer, ctx.cfg.policy_samples
    samples = sample_policy(ctx, prompts, k, mix_seed(ctx.seed, "held-out samples"))
    rewards, _ = rewards_of(model, [(tok.encode(p), tok.encode(r)) for p, r, _ in samples], tok, ctx.cfg)
    rewards = rewards.view(-1, k)
    scores = torch.tensor([score for _, _, score in samples], dtype=torch.float64).view(-1, k)
    picked = scores.gather(1, rewards.argmax(1, keepdim=True))
    metrics = {"eval/best_of_k_score": picked.mean().item(), "eval/sample_score": scores.mean().item()}
    agreement = verifier_agreement(rewards, scores)
    if agreement is not None:  # a policy that always writes the same answer leaves no pair to rank
        metrics["eval/policy_sample_agreement"] = agreement
    return metrics
