"""Export judgements as the JSONL files the training stages read (see rlhf/data/jsonl.py).

    DIR/pairs.jsonl    {"prompt", "chosen", "rejected"}       one row per A-better / B-better
    DIR/ratings.jsonl  {"prompt", "response", "rating"}       rating: 1..5 or "up" / "down"

Ties and "both bad" have no chosen/rejected and are skipped (and counted); undone ratings are
never exported. The readers want one rating scale per dataset: if the database holds both stars
and thumbs, ratings.jsonl gets the stars and DIR/ratings_thumbs.jsonl the thumbs. Each file is written atomically (temp file + os.replace), and always written,
even when empty, so a re-export never leaves a stale file behind.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from rlhf.feedback.candidates import atomic_write_lines
from rlhf.feedback.store import FeedbackStore, RatingRow


def pair_row(r: RatingRow) -> dict | None:
    """`{"prompt", "chosen", "rejected"}` for an A/B judgement, None for tie / both bad."""
    if r.choice == "A":
        return {"prompt": r.prompt, "chosen": r.shown[0], "rejected": r.shown[1]}
    if r.choice == "B":
        return {"prompt": r.prompt, "chosen": r.shown[1], "rejected": r.shown[0]}
    return None


def rating_row(r: RatingRow) -> dict:
    value: int | str = int(r.choice) if r.choice.isdigit() else r.choice
    return {"prompt": r.prompt, "response": r.shown[0], "rating": value}


def export(db: str | os.PathLike | None, out_dir: str | os.PathLike, rows: list[RatingRow] | None = None) -> dict[str, int]:
    """Write `out_dir/pairs.jsonl` and `out_dir/ratings.jsonl`; -> counts.

    Reads the SQLite file `db`, or takes `rows` (every rating, undone ones included) read
    elsewhere (the page's PostgreSQL database, through the ORM).
    Counts: pairs, ties, both_bad (compare), ratings_stars, ratings_thumbs (rate), undone.
    """
    if rows is None:
        db = Path(db)
        if not db.is_file():
            raise FileNotFoundError(f"{db}: feedback database not found")
        rows = FeedbackStore(db).ratings(include_undone=True)
    counts: Counter[str] = Counter()
    pairs, ratings = [], []
    for r in rows:
        if r.undone_at is not None:
            counts["undone"] += 1
        elif r.mode == "compare":
            row = pair_row(r)
            if row is None:
                counts["ties" if r.choice == "tie" else "both_bad"] += 1
            else:
                pairs.append(row)
        else:
            row = rating_row(r)
            counts["ratings_stars" if isinstance(row["rating"], int) else "ratings_thumbs"] += 1
            ratings.append(row)
    counts["pairs"] = len(pairs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"pairs.jsonl": pairs, "ratings.jsonl": ratings}
    thumbs_file = out / "ratings_thumbs.jsonl"
    if counts["ratings_stars"] and counts["ratings_thumbs"]:
        files["ratings.jsonl"] = [d for d in ratings if isinstance(d["rating"], int)]
        files[thumbs_file.name] = [d for d in ratings if not isinstance(d["rating"], int)]
    elif thumbs_file.exists():
        thumbs_file.unlink()  # stale, from an earlier export of mixed scales
    for name, data in files.items():
        atomic_write_lines(out / name, (json.dumps(d, ensure_ascii=False) for d in data))
    keys = ("pairs", "ties", "both_bad", "ratings_stars", "ratings_thumbs", "undone")
    return {k: counts[k] for k in keys}
