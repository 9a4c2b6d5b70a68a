"""Feedback: candidates, the SQLite store, export, and the CLI (no server)."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from rlhf.errors import DataError
from rlhf.feedback import cli
from rlhf.feedback.candidates import Candidate, load_candidates, make_items, write_candidates
from rlhf.feedback.export import export
from rlhf.feedback.store import FeedbackStore


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"prompt": "p1", "responses": ["r1a", "r1b"], "model": "m", "checkpoint": "ck/1"},
    {"prompt": "p2", "responses": ["r2a", "r2b", "r2c"]},
]


# ------------------------------------------------------------------------------ candidates


def test_load_candidates_and_items(tmp_path):
    cands = load_candidates(write_jsonl(tmp_path / "c.jsonl", ROWS))
    assert cands[0] == Candidate("p1", ("r1a", "r1b"), "m", "ck/1")
    assert cands[1].model is None and cands[1].source.endswith("c.jsonl:2")

    compare = make_items(cands, "compare")
    assert [it.responses for it in compare] == [
        ("r1a", "r1b"), ("r2a", "r2b"), ("r2a", "r2c"), ("r2b", "r2c"),
    ]
    assert compare[2].indices == (0, 2) and compare[0].checkpoint == "ck/1"
    rate = make_items(cands, "rate")
    assert [it.responses for it in rate] == [("r1a",), ("r1b",), ("r2a",), ("r2b",), ("r2c",)]
    # ids are content hashes: stable across loads, unique per item
    assert [it.id for it in make_items(cands, "compare")] == [it.id for it in compare]
    assert len({it.id for it in compare + rate}) == 9


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "responses": ["a", "b"]', "invalid JSON"),
        ('["p"]', "JSON object"),
        ('{"responses": ["a"]}', "prompt"),
        ('{"prompt": "p", "responses": []}', "non-empty list"),
        ('{"prompt": "p", "responses": ["a", 3]}', "responses[1]"),
        ('{"prompt": "p", "responses": ["a", "  "]}', "responses[1] is empty"),
        ('{"prompt": "p", "responses": ["a"], "model": 3}', "'model'"),
    ],
)
def test_bad_candidate_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "ok", "responses": ["x", "y"]}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"c\.jsonl:3: .*{re.escape(message)}"):
        load_candidates(path)


def test_compare_mode_needs_two_distinct_responses(tmp_path):
    cands = load_candidates(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "responses": ["same", "same"]}]))
    with pytest.raises(DataError, match=r"c\.jsonl:1: compare mode needs at least 2"):
        make_items(cands, "compare")
    assert len(make_items(cands, "rate")) == 1  # identical rows collapse into one item


def test_missing_and_empty_candidates(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_candidates(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no candidate rows"):
        load_candidates(tmp_path / "empty.jsonl")


def test_write_candidates_roundtrip(tmp_path):
    cands = load_candidates(write_jsonl(tmp_path / "c.jsonl", ROWS))
    out = write_candidates(tmp_path / "sub" / "again.jsonl", cands)
    assert load_candidates(out) == cands
    assert [p.name for p in out.parent.iterdir()] == ["again.jsonl"]  # no temp file left


# ----------------------------------------------------------------------------------- store


@pytest.fixture
def store_items(tmp_path):
    cands = load_candidates(write_jsonl(tmp_path / "c.jsonl", ROWS))
    store = FeedbackStore(tmp_path / "fb.sqlite")
    compare, rate = make_items(cands, "compare"), make_items(cands, "rate")
    assert store.add_items(compare) == 4
    assert store.add_items(compare + rate) == 5  # only the new ones
    return store, compare, rate


def test_store_is_wal_and_reloads_items(store_items, tmp_path):
    store, compare, rate = store_items
    with sqlite3.connect(tmp_path / "fb.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.load_items("compare") == compare
    assert store.load_items("rate") == rate
    FeedbackStore(tmp_path / "fb.sqlite")  # re-opening an existing DB is fine


def test_record_is_idempotent_and_one_live_rating_per_item(store_items):
    store, compare, _ = store_items
    item = compare[0]
    first = store.record(submission_id="sub-00000001", rater="ann", item=item, choice="A", order=(1, 0))
    assert first.status == "saved"
    again = store.record(submission_id="sub-00000001", rater="ann", item=item, choice="A", order=(1, 0))
    assert (again.status, again.rating_id) == ("duplicate", first.rating_id)
    other = store.record(submission_id="sub-00000002", rater="ann", item=item, choice="B", order=(0, 1))
    assert other.status == "already_rated"
    assert store.record(submission_id="sub-00000003", rater="bob", item=item, choice="B", order=(0, 1)).status == "saved"

    (row, _bob) = store.ratings()
    assert row.rater == "ann" and row.choice == "A" and row.prompt == "p1"
    assert row.shown == ("r1b", "r1a") and row.shown_order == (1, 0)  # what was shown as A, B
    assert (row.model, row.checkpoint) == ("m", "ck/1")
    assert row.created_at.endswith("Z") and "T" in row.created_at
    assert store.rated_item_ids("ann", "compare") == {item.id}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"submission_id": "short"}, "submission id"),
        ({"submission_id": "has space!!"}, "submission id"),
        ({"choice": "C"}, "not valid in compare"),
        ({"order": (0, 0)}, "permutation"),
    ],
)
def test_record_validates(store_items, kwargs, message):
    store, compare, _ = store_items
    args = {"submission_id": "sub-00000001", "rater": "ann", "item": compare[0], "choice": "A", "order": (0, 1)}
    with pytest.raises(ValueError, match=message):
        store.record(**{**args, **kwargs})


def test_undo_marks_the_last_live_rating_idempotently(store_items):
    store, compare, rate = store_items
    for n, item in enumerate(compare[:3]):
        store.record(submission_id=f"sub-0000000{n}", rater="ann", item=item, choice="A", order=(0, 1))
    store.record(submission_id="sub-00000009", rater="ann", item=rate[0], choice="4", order=(0,))
    u1 = store.undo_last(submission_id="undo-0000001", rater="ann", mode="compare")
    assert (u1.status, u1.item_id) == ("undone", compare[2].id)
    assert store.undo_last(submission_id="undo-0000001", rater="ann", mode="compare").status == "duplicate"
    assert store.undo_last(submission_id="undo-0000002", rater="ann", mode="compare").item_id == compare[1].id
    assert store.rated_item_ids("ann", "compare") == {compare[0].id}
    assert store.rated_item_ids("ann", "rate") == {rate[0].id}  # other mode untouched
    assert store.undo_last(submission_id="undo-0000003", rater="bob", mode="compare").status == "nothing_to_undo"
    # an undone item can be rated again
    assert store.record(submission_id="sub-0000000x", rater="ann", item=compare[2], choice="B", order=(0, 1)).status == "saved"
    assert len(store.ratings(include_undone=True)) == 5 and len(store.ratings()) == 3


# ---------------------------------------------------------------------------------- export


def _fill(store, compare, rate, scales=("stars",)):
    rec = store.record
    rec(submission_id="s-compare-1", rater="ann", item=compare[0], choice="A", order=(1, 0))
    rec(submission_id="s-compare-2", rater="ann", item=compare[1], choice="B", order=(0, 1))
    rec(submission_id="s-compare-3", rater="ann", item=compare[2], choice="tie", order=(0, 1))
    rec(submission_id="s-compare-4", rater="ann", item=compare[3], choice="both_bad", order=(0, 1))
    rec(submission_id="s-compare-5", rater="bob", item=compare[0], choice="B", order=(0, 1))
    store.undo_last(submission_id="u-compare-1", rater="bob", mode="compare")
    if "stars" in scales:
        rec(submission_id="s-rate-0001", rater="ann", item=rate[0], choice="5", order=(0,))
        rec(submission_id="s-rate-0002", rater="bob", item=rate[1], choice="1", order=(0,))
    if "thumbs" in scales:
        rec(submission_id="s-rate-0003", rater="cyd", item=rate[2], choice="up", order=(0,))
        rec(submission_id="s-rate-0004", rater="cyd", item=rate[3], choice="down", order=(0,))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_export_pairs_and_ratings(store_items, tmp_path):
    store, compare, rate = store_items
    _fill(store, compare, rate)
    out = tmp_path / "out"
    counts = export(store.path, out)
    assert counts == {"pairs": 2, "ties": 1, "both_bad": 1, "ratings_stars": 2, "ratings_thumbs": 0, "undone": 1}
    assert read_jsonl(out / "pairs.jsonl") == [
        {"prompt": "p1", "chosen": "r1b", "rejected": "r1a"},  # A was r1b (order 1, 0)
        {"prompt": "p2", "chosen": "r2b", "rejected": "r2a"},
    ]
    assert read_jsonl(out / "ratings.jsonl") == [
        {"prompt": "p1", "response": "r1a", "rating": 5},
        {"prompt": "p1", "response": "r1b", "rating": 1},
    ]
    assert sorted(p.name for p in out.iterdir()) == ["pairs.jsonl", "ratings.jsonl"]  # no temp files


def test_export_reads_back_with_the_project_readers(store_items, tmp_path):
    jsonl = pytest.importorskip("rlhf.data.jsonl")
    store, compare, rate = store_items
    _fill(store, compare, rate)
    export(store.path, tmp_path / "out")
    pairs = jsonl.read_preference_pairs(str(tmp_path / "out" / "pairs.jsonl"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p1", "r1b", "r1a"), ("p2", "r2b", "r2a")]
    ratings = jsonl.read_ratings(str(tmp_path / "out" / "ratings.jsonl"))
    assert [(r.response, r.label, r.num_levels) for r in ratings] == [("r1a", 4, 5), ("r1b", 0, 5)]


def test_export_splits_mixed_scales_and_removes_stale_files(store_items, tmp_path):
    jsonl = pytest.importorskip("rlhf.data.jsonl")
    store, compare, rate = store_items
    _fill(store, compare, rate, scales=("stars", "thumbs"))
    out = tmp_path / "out"
    counts = export(store.path, out)
    assert (counts["ratings_stars"], counts["ratings_thumbs"]) == (2, 2)
    assert [r.num_levels for r in jsonl.read_ratings(str(out / "ratings.jsonl"))] == [5, 5]
    assert [r.label for r in jsonl.read_ratings(str(out / "ratings_thumbs.jsonl"))] == [1, 0]
    # undo the thumbs: a re-export no longer has mixed scales and drops the stale thumbs file
    for n in range(2):
        store.undo_last(submission_id=f"u-thumbs-{n:04d}", rater="cyd", mode="rate")
    export(store.path, out)
    assert not (out / "ratings_thumbs.jsonl").exists()


def test_export_of_an_empty_db_writes_empty_files(tmp_path):
    FeedbackStore(tmp_path / "fb.sqlite")
    assert export(tmp_path / "fb.sqlite", tmp_path / "out")["pairs"] == 0
    assert (tmp_path / "out" / "pairs.jsonl").read_text() == ""


# ------------------------------------------------------------------------------------- CLI


def test_cli_export(store_items, tmp_path, capsys):
    store, compare, rate = store_items
    _fill(store, compare, rate)
    assert cli.main(["export", "--db", str(store.path), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "2 pairs (skipped 1 ties, 1 both-bad)" in out and "2 ratings" in out and "1 undone" in out


def test_cli_export_missing_db(tmp_path, capsys):
    assert cli.main(["export", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_cli_refuses_to_bind_beyond_loopback_without_token(host, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    cands = write_jsonl(tmp_path / "c.jsonl", ROWS)
    code = cli.main(["serve", "--candidates", str(cands), "--db", str(tmp_path / "fb.sqlite"), "--host", host])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: refusing to bind {host} without --token")
    assert not (tmp_path / "fb.sqlite").exists()  # refused before touching anything


def test_cli_serve_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["serve", "--db", str(tmp_path / "fb.sqlite"), "--port", "0"]) == 2
    assert "no compare items" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    assert cli.main(["serve", "--candidates", str(bad), "--db", str(tmp_path / "fb.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:1" in err and err.count("\n") == 1


def test_cli_usage():
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert cli.build_parser().prog == "python -m rlhf feedback"
