"""Online human feedback: rounds of sample -> publish to the feedback page -> wait for raters ->
one pass of DPO on their judgements.

Round r covers optimizer steps r*S .. (r+1)*S - 1 (S = steps_per_round). At its first step:
  1. batch_size * S training prompts (a pure function of (seed, r)) get two responses each,
     sampled from the CURRENT policy with the KV cache; each prompt whose two responses
     differ is one compare item, published under the model name `<run name>/<slot>` and
     checkpoint "round r" (the page shows both to the rater). The items go to
     `rounds/items_<r>.jsonl` before they are published;
  2. the stage waits until `min_rated` of the round's items have `ratings_per_item` live
     ratings, or `timeout_s` passes, with a progress line every `progress_s`;
  3. every live rating of the run's items not used by an earlier round (the round files are
     the ledger) becomes a row: A/B better is a pair, tie / both bad are kept and counted.
     Ratings that came late for an earlier round's items count here; none is used twice;
  4. the reference's log-probs of the pairs are computed once, with the round's starting
     weights, and the rows go to `rounds/round_<r>.jsonl`.
The S steps then go once through the round's pairs (rlhf/rounds.py), as external-reward DPO.

Where ratings come from: `url` names a page someone runs (`python -m rlhf feedback serve` with
$RLHF_FEEDBACK_TRAINER_KEY set; the stage reads the key from the same variable). Without
`url` the stage starts the page itself on `db` (default `<stage dir>/feedback.sqlite`) or
`database_url`, prints its address, and with `simulated_raters: N` starts N simulated raters
(rlhf/feedback/simulate.py: the task's verifier, `simulated_noise` of the labels flipped).

Crashes and resume: ratings live in the page's database, never only in this process. A
resumed run re-publishes the round's items from its items file (idempotent: an item's id is
its content's hash), waits again, and a round whose rows were written is reloaded, never
made again; so every rating is used exactly once and training resumes as every stage does.
DDP: every rank samples its share and the candidates are gathered; rank 0 alone talks to the
page, the ranks agree each poll whether the wait is over, and rank 0's rows are broadcast.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from rlhf import files
from rlhf.config import StageConfig
from rlhf.data.examples import PreferencePair
from rlhf.errors import ConfigError, DataError
from rlhf.feedback.candidates import Item, item_id
from rlhf.feedback.live import TOKEN_ENV, TRAINER_KEY_ENV, FeedbackPageError, LocalPage, TrainerClient
from rlhf.feedback.web.serve import is_loopback
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
from rlhf.rounds import (
    RoundPairs,
    all_round_rows,
    attach_reference,
    gather_rows,
    load_or_make,
    new_round_rows,
    rank_zero_says,
    read_round_rows,
    recent_means,
    round_batches,
    round_path,
    round_training_step,
    row_pair,
)
from rlhf.sampling import SamplingConfig, generate_responses
from rlhf.stage_context import StageContext, StageResult
from rlhf.training import adamw_with_schedule, mix_seed

KIND = "online_feedback"
STATUS = {"A": "pair", "B": "pair", "tie": "tie", "both_bad": "both_bad"}
log = logging.getLogger("rlhf")


@dataclass
class Config(PreferenceLossConfig, StageConfig):
    kind: str = KIND
    max_steps: int = 48  # rounds = ceil(max_steps / steps_per_round)
    steps_per_round: int = 4
    batch_size: int = 32  # prompts per step: a round publishes up to batch_size * steps_per_round items
    lr: float = 5e-5
    warmup_steps: int = 8
    nll_weight: float = 1.0  # as the other DPO stages on this task (docs/results_dpo.md)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 24
    generation_batch_size: int = 256
    # reference = each round's starting weights (the policy that sampled the round's items);
    # False: the stage's starting weights throughout
    refresh_reference: bool = True
    # -- where the ratings come from
    url: Optional[str] = None  # a running page with the trainer API; None: the stage starts one
    db: Optional[str] = None  # SQLite file of the page the stage starts; None: <stage dir>/feedback.sqlite
    database_url: Optional[str] = None  # postgres://...: the page the stage starts uses it instead of db
    host: str = "127.0.0.1"  # the page the stage starts; another address needs a token (see the README)
    port: int = 0  # 0: any free port (printed); fix it so raters keep their link across a resume
    ratings_per_item: int = 1  # the page shows a rater only items with fewer live ratings
    min_rated: float = 1.0  # a round waits until this fraction of its items has ratings_per_item ratings
    timeout_s: float = 600.0  # ... or this long, then trains on what came in
    poll_s: float = 1.0
    progress_s: float = 15.0
    simulated_raters: int = 0  # raters the stage starts (tests, demos); they rate with the task's verifier
    simulated_noise: float = 0.0  # the fraction of their judgements flipped
    simulated_judge: str = "rlhf.tasks.builtin.verifier_reward"
    eval_prompts: int = 64  # held-out prompts evaluated at the start of every round; 0: off


def rating_row(rating: dict, index: int, finished: dict[str, list[bool]]) -> dict:
    """One rating (a RatingRow from the page, as a dict) as a round row: status "pair" with
    chosen / rejected for A or B better, "tie" or "both_bad" otherwise. `finished`: item id ->
    whether each response (in candidate order) ended with EOS; items not known count as finished.

    Raises DataError for a rating that is not a compare judgement (the stage trains on pairs)."""
    choice, shown = rating["choice"], rating["shown"]
    if rating["mode"] != "compare" or choice not in STATUS or len(shown) != 2:
        raise DataError(f"rating {rating['id']} by {rating['rater']!r} is not an A/B judgement ({rating['mode']}: {choice!r})")
    done = finished.get(rating["item_id"], [True, True])
    shown_done = [done[k] if k < len(done) else True for k in rating["shown_order"]]
    row = {
        "index": index, "rating_id": rating["id"], "rater": rating["rater"], "item_id": rating["item_id"],
        "checkpoint": rating["checkpoint"], "prompt": rating["prompt"], "choice": choice, "status": STATUS[choice],
        "chosen": None, "rejected": None,
        "candidates": [{"response": text, "finished": f} for text, f in zip(shown, shown_done)],
    }
    if choice in ("A", "B"):
        win = 0 if choice == "A" else 1
        row.update(chosen=shown[win], rejected=shown[1 - win], chosen_finished=shown_done[win], rejected_finished=shown_done[1 - win])
    return row


def items_path(stage_dir: Path, r: int) -> Path:
    return Path(stage_dir) / "rounds" / f"items_{r:03d}.jsonl"


def round_stats(rows: list[dict], items: list[dict], task) -> dict[str, float]:
    count = Counter(row["status"] for row in rows)
    stats = {
        "round/items": float(len(items)), "round/ratings": float(len(rows)), "round/pairs": float(count["pair"]),
        "round/ties": float(count["tie"]), "round/both_bad": float(count["both_bad"]),
        "round/raters": float(len({row["rater"] for row in rows})),
    }
    if hasattr(task, "score"):  # how often the raters' pairs agree with the task's verifier
        scored = [(task.score(row["prompt"], row["chosen"]), task.score(row["prompt"], row["rejected"])) for row in rows if row["status"] == "pair"]
        unequal = [(c, r) for c, r in scored if c != r]
        if unequal:  # none: left out, not NaN (metrics.json stays plain JSON)
            stats["round/verifier_agreement"] = sum(c > r for c, r in unequal) / len(unequal)
    return stats


class OnlineFeedbackModule(L.LightningModule):
    def __init__(self, ctx: StageContext, reference: Optional[torch.nn.Module], client: Optional[TrainerClient], model_name: str, url: Optional[str], page: Optional[LocalPage]):
        super().__init__()
        self.policy, self.cfg, self.ctx = ctx.policy, ctx.cfg, ctx
        object.__setattr__(self, "reference", reference)  # not a submodule: out of optimizer, DDP, checkpoints
        self.client, self.model_name, self.url, self.page = client, model_name, url, page
        self.round = -1
        self.data: Optional[RoundPairs] = None
        self.recent: deque = deque(maxlen=20)
        self.last_round: dict[str, float] = {}

    def configure_model(self):
        shard_in(self, self.policy)  # trainer.strategy=fsdp (rlhf/models/fsdp.py)

    def on_train_start(self):
        if self.reference is not None:
            self.reference.to(self.device)

    def on_train_batch_start(self, batch, batch_idx):
        r = int(batch[0])
        if r != self.round:
            self._start_round(r)

    # -- a round ----------------------------------------------------------------------------
    def _start_round(self, r: int) -> None:
        make = lambda: new_round_rows(self, r, self._make_rows, self.cfg.eval_prompts)  # noqa: E731
        rows, reloaded = load_or_make(round_path(self.ctx.stage_dir, r), make, self.trainer.is_global_zero)
        if reloaded and self.trainer.is_global_zero:
            log.info("%s round %d: reloaded", self.ctx.slot, r)
        items = files_rows(items_path(self.ctx.stage_dir, r))
        pairs = [row for row in rows if row["status"] == "pair"]
        stand_in = items[0]["responses"][0] if items else (rows[0]["candidates"][0]["response"] if rows else " ")
        prompt = items[0]["prompt"] if items else (rows[0]["prompt"] if rows else "")
        self.data = RoundPairs.build(
            [row_pair(row) for row in pairs], [row["ref"] for row in pairs] if needs_reference(self.cfg) else None,
            PreferencePair(prompt, stand_in, stand_in), self.ctx.tokenizer, self.ctx.policy.max_seq_len, self.ctx.seed, r,
        )
        self.round = r
        stats = round_stats(rows, items, self.ctx.task)
        self.last_round.update(stats)
        log_now(self, stats)
        if not self.trainer.is_global_zero:
            return
        log.info("%s round %d: %s", self.ctx.slot, r, {k: round(v, 4) for k, v in stats.items()})
        if not pairs:
            log.warning("%s round %d: no A/B judgement came in; the round's steps train on nothing", self.ctx.slot, r)

    def _make_rows(self, r: int) -> list[dict]:
        """Round r's rows: sample and publish its items (or reload them), wait, read the ratings."""
        sampler = gather_policy(self.policy, self.ctx.new_policy)
        items, _ = load_or_make(items_path(self.ctx.stage_dir, r), lambda: self._sample_items(r, sampler), self.trainer.is_global_zero)
        rows = self._wait_for_ratings(r, items)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            box = [rows]
            torch.distributed.broadcast_object_list(box, src=0)
            rows = box[0]
        if needs_reference(self.cfg):
            rank, world = self.trainer.global_rank, self.trainer.world_size
            mine = rows[rank::world]
            attach_reference(mine, sampler if self.cfg.refresh_reference else self.reference, self.ctx.tokenizer, self.ctx.policy.max_seq_len, self.cfg.batch_size, self.device)
            rows = gather_rows(mine, world)
        return rows

    def _sample_items(self, r: int, sampler) -> list[dict]:
        """Round r's compare items (every rank samples its share), published by rank 0."""
        cfg, task, tok = self.cfg, self.ctx.task, self.ctx.tokenizer
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rng = random.Random(mix_seed(self.ctx.seed, "prompts", r))
        prompts = [task.train_prompt(rng) for _ in range(cfg.batch_size * cfg.steps_per_round)]
        mine = list(range(len(prompts)))[rank::world]
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(self.ctx.seed, "sample", r, rank))
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        repeated = [prompts[i] for i in mine for _ in range(2)]
        responses, finished = generate_responses(sampler, tok, repeated, sampling, cfg.generation_batch_size, generator)
        rows = []
        for j, i in enumerate(mine):
            pair, done = responses[2 * j : 2 * j + 2], finished[2 * j : 2 * j + 2]
            if pair[0] != pair[1] and all(t.strip() for t in pair):  # nothing to compare otherwise
                rows.append({"index": i, "prompt": prompts[i], "responses": list(pair), "finished": list(done)})
        rows, seen = gather_rows(rows, world), set()
        for row in rows:
            row["id"] = item_id("compare", row["prompt"], row["responses"], self.model_name, f"round {r}")
        rows = [row for row in rows if not (row["id"] in seen or seen.add(row["id"]))]  # a prompt drawn twice
        if self.trainer.is_global_zero:
            files.write_jsonl(items_path(self.ctx.stage_dir, r), rows)  # before publishing: a resume finds them
        return rows

    def _wait_for_ratings(self, r: int, items: list[dict]) -> Optional[list[dict]]:
        """Rank 0: publish round r's items (again, after a resume: idempotent), wait, and turn every
        rating not used by an earlier round into a row (-> the rows; None on other ranks, which
        only join each poll's vote on whether the wait is over)."""
        cfg, zero = self.cfg, self.trainer.is_global_zero
        if zero:
            published = [Item(row["id"], "compare", row["prompt"], tuple(row["responses"]), (0, 1), self.model_name, f"round {r}") for row in items]
            new = self.client.publish(published) if published else 0
            log.info("%s round %d: %d items to rate (%d new) at %s", self.ctx.slot, r, len(items), new, self.url)
            used = {row["rating_id"] for row in all_round_rows(self.ctx.stage_dir)}
            ids = {row["id"] for row in items}
            # every item this run published, with which responses ended with EOS (another run
            # may publish under the same model name: its ratings are not ours)
            finished = {row["id"]: row["finished"] for path in sorted((Path(self.ctx.stage_dir) / "rounds").glob("items_*.jsonl")) for row in read_round_rows(path)}
            need = math.ceil(cfg.min_rated * len(ids))
        waited = 0.0
        start = last_note = time.monotonic()
        while True:
            over = False
            if zero:
                if self.page is not None:
                    self.page.check()  # the page the stage started is still up (else: one line)
                ratings = [x for x in self.client.ratings(self.model_name) if x["item_id"] in finished]
                per_item = Counter(x["item_id"] for x in ratings if x["item_id"] in ids)
                rated = sum(n >= cfg.ratings_per_item for n in per_item.values())
                waited = time.monotonic() - start
                over = rated >= need or waited >= cfg.timeout_s
                if over and rated < need:
                    log.warning("%s round %d: timed out after %.0f s with %d of %d items rated", self.ctx.slot, r, waited, rated, len(ids))
                elif not over and time.monotonic() - last_note >= cfg.progress_s:
                    raters = len({x["rater"] for x in ratings if x["item_id"] in ids})
                    log.info("%s round %d: %d/%d items rated (%d raters on this round), %.0f s to the timeout; rate at %s", self.ctx.slot, r, rated, len(ids), raters, cfg.timeout_s - waited, self.url)
                    last_note = time.monotonic()
            if rank_zero_says(over):
                break
            if zero:
                time.sleep(cfg.poll_s)
        fresh = [x for x in ratings if x["id"] not in used] if zero else []
        if rank_zero_says(not fresh and waited >= cfg.timeout_s):  # nothing at all: fail, resumably
            raise FeedbackPageError(
                f"stages.{self.ctx.slot} round {r}: no rating came in within timeout_s={cfg.timeout_s:g} s "
                f"(raters at {self.url}?); its items stay published: continue with resume={Path(self.ctx.stage_dir).parent.parent}")
        if not zero:
            return None
        self.last_round["round/wait_s"] = waited
        return [rating_row(x, k, finished) for k, x in enumerate(fresh)]

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        return round_training_step(self, batch, lambda tokens, mask, ref: preference_loss(self.cfg, *pair_logprobs(self.policy, tokens, mask), ref))

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.cfg)

    def final_metrics(self) -> dict[str, float]:
        rows = all_round_rows(self.ctx.stage_dir)
        count = Counter(row["status"] for row in rows)
        return {
            **recent_means(self.recent), **self.last_round,
            "rounds/ratings": float(len(rows)), "rounds/pairs": float(count["pair"]),
            "rounds/ties": float(count["tie"]), "rounds/both_bad": float(count["both_bad"]),
        }


def files_rows(path: Path) -> list[dict]:
    return read_round_rows(path) if path.exists() else []


def check_config(cfg: Config, slot: str) -> None:
    """The checks that need no model or task (run when the run's config is read)."""
    check_loss_config(cfg, slot)
    if cfg.steps_per_round < 1 or cfg.ratings_per_item < 1:
        raise ConfigError(f"stages.{slot}: steps_per_round and ratings_per_item must be >= 1")
    if not 0.0 <= cfg.min_rated <= 1.0 or not cfg.timeout_s > 0 or not cfg.poll_s > 0:
        raise ConfigError(f"stages.{slot}: need 0 <= min_rated <= 1, timeout_s > 0 and poll_s > 0")
    if not 0.0 <= cfg.simulated_noise <= 1.0 or cfg.simulated_raters < 0:
        raise ConfigError(f"stages.{slot}: simulated_noise must be in [0, 1] and simulated_raters >= 0")
    if cfg.url and cfg.simulated_raters:
        raise ConfigError(f"stages.{slot}: simulated_raters need the page the stage starts (their accounts are made there); drop url")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"stages.{slot}.port={cfg.port} is not a port number")


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    check_config(cfg, ctx.slot)
    if not hasattr(ctx.task, "train_prompt"):
        raise ConfigError(f"stages.{ctx.slot}: task {ctx.run_cfg.task.name!r} has no training prompts to sample from")
    run_dir = Path(ctx.stage_dir).parent.parent
    model_name = f"{ctx.run_cfg.get('name') or run_dir.name}/{ctx.slot}"
    if not cfg.url and not is_loopback(cfg.host) and not os.environ.get(TOKEN_ENV):
        raise ConfigError(f"stages.{ctx.slot}.host={cfg.host} shares the page beyond this machine: set ${TOKEN_ENV} to a long random token first")
    page = client = url = None
    try:
        if ctx.is_global_zero:
            if cfg.url:
                key = os.environ.get(TRAINER_KEY_ENV)
                if not key:
                    raise ConfigError(f"stages.{ctx.slot}.url is set: put the page's trainer key in ${TRAINER_KEY_ENV} (as for its `feedback serve`)")
                client = TrainerClient(cfg.url, key)
            else:
                page = LocalPage(
                    ctx.stage_dir, mode="compare", db=cfg.db or str(Path(ctx.stage_dir) / "feedback.sqlite"),
                    database_url=cfg.database_url, host=cfg.host, port=cfg.port, ratings_per_item=cfg.ratings_per_item,
                    simulated_raters=cfg.simulated_raters, noise=cfg.simulated_noise, judge=cfg.simulated_judge, seed=ctx.seed,
                )
                client = TrainerClient(page.start(), page.key)
            url = client.base + "/"  # never the ?token=: it would end up in the logs
            client.ratings(model_name)  # reachable, and the key taken, before any sampling
            log.info("%s: the feedback page is at %s%s", ctx.slot, url,
                     f" ({cfg.simulated_raters} simulated raters, noise {cfg.simulated_noise})" if cfg.simulated_raters else "")
        reference = starting_reference(ctx) if needs_reference(cfg) and not cfg.refresh_reference else None
        module = OnlineFeedbackModule(ctx, reference, client, model_name, url, page)
        ctx.fit(module, round_batches(cfg.steps_per_round * cfg.accumulate_grad_batches))
    finally:
        if page is not None:
            page.stop()
    metrics = module.final_metrics()
    if not metrics["rounds/pairs"]:  # the stage trained on nothing: never mark it complete
        raise DataError(f"stages.{ctx.slot}: no A/B judgement came in during any round, nothing was trained (raters at {url}?)")
    return StageResult(ctx.policy, metrics)
