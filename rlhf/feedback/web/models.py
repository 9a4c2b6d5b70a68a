"""Items to show and ratings. The `ratings` table keeps the columns `FeedbackStore` (store.py)
reads, so `feedback export` reads a SQLite file the page wrote exactly as before.

Ratings are never deleted: undo stamps `undone_at`. `submission_id` (and `undone_by` for undo
requests) is UNIQUE, so a retried POST stores nothing twice; a partial UNIQUE constraint allows
one live rating per rater and item.
"""

from __future__ import annotations

import json

from django.db import models

from rlhf.feedback.candidates import Item as CandidateItem

MODES = [("compare", "compare"), ("rate", "rate")]


class Item(models.Model):
    key = models.CharField(max_length=64, unique=True)  # Item.id from candidates.make_items
    mode = models.CharField(max_length=16, choices=MODES)
    prompt = models.TextField()
    responses = models.TextField()  # JSON list: 2 (compare) or 1 (rate)
    indices = models.TextField()  # JSON list: positions in the candidate row
    model = models.TextField(null=True, blank=True)
    checkpoint = models.TextField(null=True, blank=True)
    added_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.mode} {self.key}: {self.prompt[:60]}"

    def as_item(self) -> CandidateItem:
        return CandidateItem(
            self.key, self.mode, self.prompt, tuple(json.loads(self.responses)),
            tuple(json.loads(self.indices)), self.model, self.checkpoint,
        )


class Rating(models.Model):
    submission_id = models.CharField(max_length=64, unique=True)
    rater = models.CharField(max_length=150)
    created_at = models.CharField(max_length=32)  # UTC, ISO 8601 (as store.utc_now writes it)
    mode = models.CharField(max_length=16, choices=MODES)
    item_id = models.CharField(max_length=64)
    prompt = models.TextField()
    shown = models.TextField()  # JSON list of the responses in the order shown (A, B)
    shown_order = models.TextField()  # JSON list: their positions in the candidate row
    choice = models.CharField(max_length=16)
    model = models.TextField(null=True, blank=True)
    checkpoint = models.TextField(null=True, blank=True)
    undone_at = models.CharField(max_length=32, null=True, blank=True)
    undone_by = models.CharField(max_length=64, null=True, blank=True, unique=True)

    class Meta:
        db_table = "ratings"
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["rater", "item_id"], condition=models.Q(undone_at__isnull=True), name="ratings_one_live"
            )
        ]
        indexes = [models.Index(fields=["rater", "mode", "id"], name="ratings_by_rater")]

    def __str__(self) -> str:
        return f"{self.rater}: {self.choice} on {self.item_id}"
