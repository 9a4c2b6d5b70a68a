"""Writes and reads of ratings through the ORM: the same rules as `FeedbackStore` (store.py),
on SQLite or PostgreSQL.

Idempotent per submission id (UNIQUE in the database, so two racing copies of one POST store
one row: the loser's INSERT fails and it answers "duplicate"). One live rating per rater and
item (a partial UNIQUE constraint). Undo stamps `undone_at`/`undone_by`; nothing is deleted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from django.db import IntegrityError, transaction
from django.db.models import Count, QuerySet

from rlhf.feedback.candidates import Item
from rlhf.feedback.store import Outcome, RatingRow, check_judgement, utc_now, valid_submission_id
from rlhf.feedback.web import models


def _dumps(value) -> str:
    return json.dumps(list(value), ensure_ascii=False)


def add_items(items: Iterable[Item]) -> int:
    """Store items not stored yet (by id), keeping their order; -> how many were new."""
    items = list(items)
    with transaction.atomic():
        known = set(models.Item.objects.filter(key__in=[it.id for it in items]).values_list("key", flat=True))
        new = [
            models.Item(key=it.id, mode=it.mode, prompt=it.prompt, responses=_dumps(it.responses),
                        indices=_dumps(it.indices), model=it.model, checkpoint=it.checkpoint)
            for it in items if it.id not in known
        ]
        models.Item.objects.bulk_create(new, ignore_conflicts=True)
    return len(new)


def load_items(mode: str) -> list[Item]:
    return [row.as_item() for row in models.Item.objects.filter(mode=mode).order_by("id")]


def get_item(key: str, mode: str) -> Item | None:
    row = models.Item.objects.filter(key=key, mode=mode).first()
    return row.as_item() if row else None


def open_items(rater: str, mode: str, ratings_per_item: int | None = None, newest_first: bool = False) -> QuerySet:
    """Items of `mode` still for `rater` (oldest first, or newest): not rated by them and, with
    `ratings_per_item`, not yet rated that many times by anyone (so raters share the work)."""
    live = models.Rating.objects.filter(mode=mode, undone_at__isnull=True)
    todo = models.Item.objects.filter(mode=mode).exclude(key__in=live.filter(rater=rater).values("item_id"))
    if ratings_per_item:
        full = live.values("item_id").annotate(n=Count("id")).filter(n__gte=ratings_per_item).values("item_id")
        todo = todo.exclude(key__in=full)
    return todo.order_by("-id" if newest_first else "id")


def rated_count(rater: str, mode: str) -> int:
    return models.Rating.objects.filter(rater=rater, mode=mode, undone_at__isnull=True).count()


def record(*, submission_id: str, rater: str, item: Item, choice: str, order: Iterable[int]) -> Outcome:
    order = check_judgement(submission_id, item, choice, order)
    for _ in range(3):
        with transaction.atomic():
            row = models.Rating.objects.filter(submission_id=submission_id).values_list("id", "item_id").first()
            if row:
                return Outcome("duplicate", row[0], row[1])
            live = models.Rating.objects.filter(rater=rater, item_id=item.id, undone_at__isnull=True)
            row_id = live.values_list("id", flat=True).first()
            if row_id:
                return Outcome("already_rated", row_id, item.id)
            try:
                with transaction.atomic():  # a savepoint: a lost race rolls back only the INSERT
                    rating = models.Rating.objects.create(
                        submission_id=submission_id, rater=rater, created_at=utc_now(), mode=item.mode,
                        item_id=item.id, prompt=item.prompt, shown=_dumps(item.responses[k] for k in order),
                        shown_order=_dumps(item.indices[k] for k in order), choice=choice,
                        model=item.model, checkpoint=item.checkpoint,
                    )
                return Outcome("saved", rating.id, item.id)
            except IntegrityError:
                continue  # another request won the race: look again, it is now visible
    raise RuntimeError("could not store the rating (conflicting writes); try again")


def undo_last(*, submission_id: str, rater: str, mode: str) -> Outcome:
    if not valid_submission_id(submission_id):
        raise ValueError("submission id must be 8-64 characters of [A-Za-z0-9_-]")
    for _ in range(5):
        with transaction.atomic():
            row = models.Rating.objects.filter(undone_by=submission_id).values_list("id", "item_id").first()
            if row:
                return Outcome("duplicate", row[0], row[1])
            last = (models.Rating.objects.filter(rater=rater, mode=mode, undone_at__isnull=True)
                    .order_by("-id").values_list("id", "item_id").first())
            if not last:
                return Outcome("nothing_to_undo")
            try:
                with transaction.atomic():
                    changed = models.Rating.objects.filter(id=last[0], undone_at__isnull=True).update(
                        undone_at=utc_now(), undone_by=submission_id
                    )
            except IntegrityError:
                continue
            if changed:
                return Outcome("undone", last[0], last[1])
    raise RuntimeError("could not undo (conflicting writes); try again")


def ratings(*, include_undone: bool = False, model: str | None = None, after: int = 0) -> list[RatingRow]:
    """Ratings in the order they were made; `model`: only of items published under that model
    name (one training run's); `after`: only those with a larger id."""
    rows = models.Rating.objects.filter(id__gt=after).order_by("id")
    if not include_undone:
        rows = rows.filter(undone_at__isnull=True)
    if model is not None:
        rows = rows.filter(model=model)
    return [
        RatingRow(r.id, r.submission_id, r.rater, r.created_at, r.mode, r.item_id, r.prompt,
                  tuple(json.loads(r.shown)), tuple(json.loads(r.shown_order)), r.choice, r.model,
                  r.checkpoint, r.undone_at)
        for r in rows
    ]
