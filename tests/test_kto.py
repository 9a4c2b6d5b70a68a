"""The KTO stage (issue #18 item 2): thumbs from the feedback page train it, the built-in task's
pairs are taken apart into unpaired rows, star ratings are refused in one line."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_dpo import make_ctx, snapshot

from rlhf.errors import DataError
from rlhf.feedback.candidates import Candidate, make_items
from rlhf.feedback.export import export
from rlhf.feedback.store import FeedbackStore
from rlhf.logprobs import sequence_logprobs
from rlhf.models import build_model
from rlhf.sampling import encode_examples
from rlhf.stages import kto
from rlhf.tasks.builtin import careless_answer


def _thumbs_export(tmp_path, task, n=24):
    """A feedback database in thumbs mode, rated like a careful person would (the right answer
    up, a careless one down), exported as the page's users export it."""
    rng = random.Random(0)
    examples = [e for e in (task.sft_example(rng) for _ in range(3 * n)) if careless_answer(e.prompt) != e.response][:n]
    cands = [Candidate(e.prompt, (e.response, careless_answer(e.prompt)), "tiny", None) for e in examples]
    store = FeedbackStore(tmp_path / "fb.sqlite")
    items = make_items(cands, "rate")
    store.add_items(items)
    truth = {(e.prompt, e.response) for e in examples}
    for k, item in enumerate(items):
        choice = "up" if (item.prompt, item.responses[0]) in truth else "down"
        store.record(submission_id=f"thumbs-{k:04d}", rater="ann", item=item, choice=choice, order=(0,))
    counts = export(store.path, tmp_path / "fb")
    assert counts["ratings_thumbs"] == len(items)
    return tmp_path / "fb" / "ratings.jsonl"


def _logratios(ctx, start, rows):
    """policy - starting-weights summed log-probs of (prompt, response) rows."""
    tokens, mask = encode_examples(ctx.tokenizer, rows)
    reference = build_model(ctx.run_cfg.model, ctx.tokenizer.vocab_size)
    reference.load_state_dict(start)
    with torch.no_grad():
        return sequence_logprobs(ctx.policy(tokens), tokens, mask) - sequence_logprobs(reference(tokens), tokens, mask)


def test_kto_learns_thumbs_from_the_feedback_page(tmp_path):
    ctx = make_ctx(tmp_path / "s", kind="kto", max_steps=12, batch_size=8, lr=3e-3, warmup_steps=0, beta=0.5)
    ratings = _thumbs_export(tmp_path, ctx.task)
    rows = [json.loads(line) for line in ratings.read_text().splitlines()]
    assert {r["rating"] for r in rows} == {"up", "down"}
    ctx.cfg.data = str(ratings)
    start = snapshot(ctx.policy)
    result = kto.run(ctx)
    examples = [type("Row", (), {"prompt": r["prompt"], "response": r["response"]}) for r in rows]
    logratios = _logratios(ctx, start, examples)
    up = torch.tensor([r["rating"] == "up" for r in rows])
    # the thumbs-up answers gained log-probability against the starting weights, the thumbs-down lost it
    assert logratios[up].mean() > 0 > logratios[~up].mean()
    assert result.metrics["train/rewards_desirable"] > result.metrics["train/rewards_undesirable"]


def test_star_ratings_are_refused_in_one_line(tmp_path):
    path = tmp_path / "stars.jsonl"
    path.write_text(json.dumps({"prompt": "sort: cba\n", "response": "abc", "rating": 5}) + "\n")
    ctx = make_ctx(tmp_path / "s", kind="kto", data=str(path))
    with pytest.raises(DataError, match=r"KTO needs thumbs up / down ratings, these are 1-5 stars"):
        kto.run(ctx)


def test_builtin_rows_are_the_task_pairs_taken_apart(tmp_path):
    ctx = make_ctx(tmp_path / "s", kind="kto", batch_size=6)
    rows = kto.RatedRows(ctx)
    items = rows.items(3)
    assert items == rows.items(3) and len(items) == 6  # a pure function of the step
    assert sum(d for _, _, d in items) == 3  # each pair: one up, one down
    batch = rows.make_batch(3, 0, 1)
    assert batch["tokens"].shape[0] == batch["mismatched_tokens"].shape[0] == 6
    assert torch.equal(batch["desirable"], torch.tensor([d for _, _, d in items]))
    # row i's mismatched row: row i's prompt, then row i + 1's response
    ids = batch["mismatched_tokens"][0][batch["mismatched_mask"][0].bool()].tolist()
    assert ids == ctx.tokenizer.encode(items[1][1]) + [ctx.tokenizer.eos_id]


def test_a_batch_of_one_row_has_no_mismatched_row(tmp_path):
    ctx = make_ctx(tmp_path / "s", kind="kto", batch_size=1)
    batch = kto.RatedRows(ctx).make_batch(0, 0, 1)
    assert "mismatched_tokens" not in batch and batch["tokens"].shape[0] == 1
