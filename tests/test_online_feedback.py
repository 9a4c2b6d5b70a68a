"""The online feedback stage: ratings to pairs, its config checks, the trainer client's errors,
and end to end with simulated raters rating over HTTP, killed mid-round and resumed: every
rating is used by exactly one round and none is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

pytest.importorskip("django")
pytest.importorskip("gunicorn")

from conftest import REPO, TINY, run_cli  # noqa: E402

from rlhf.errors import ConfigError, DataError  # noqa: E402
from rlhf.feedback.candidates import Item  # noqa: E402
from rlhf.feedback.live import FeedbackPageError, LocalPage, TrainerClient  # noqa: E402
from rlhf.feedback.store import FeedbackStore  # noqa: E402
from rlhf.stages.online_feedback import Config, check_config, rating_row  # noqa: E402


def rating(choice, shown_order=(1, 0), mode="compare"):
    return {"id": 7, "rater": "ann", "item_id": "it", "checkpoint": "round 2", "prompt": "sort: ba\n",
            "choice": choice, "mode": mode, "shown": ["ba", "ab"], "shown_order": list(shown_order)}


def test_rating_row_pairs_and_finished_flags():
    # candidate 0 = "ab" finished, candidate 1 = "ba" cut off; shown as (B: "ba", A: "ab") -> order (1, 0)
    finished = {"it": [True, False]}
    row = rating_row(rating("B"), 3, finished)
    assert (row["status"], row["chosen"], row["rejected"]) == ("pair", "ab", "ba")
    assert (row["chosen_finished"], row["rejected_finished"]) == (True, False)
    assert (row["index"], row["rating_id"], row["rater"], row["checkpoint"]) == (3, 7, "ann", "round 2")
    row = rating_row(rating("A"), 0, finished)
    assert (row["chosen"], row["rejected"], row["chosen_finished"]) == ("ba", "ab", False)
    for choice in ("tie", "both_bad"):
        row = rating_row(rating(choice), 0, {})
        assert row["status"] == choice and row["chosen"] is None and [c["finished"] for c in row["candidates"]] == [True, True]
    with pytest.raises(DataError, match="rating 7 by 'ann' is not an A/B judgement"):
        rating_row(rating("up", mode="rate"), 0, {})


@pytest.mark.parametrize("change, message", [
    ({"min_rated": 1.5}, "min_rated"),
    ({"timeout_s": 0.0}, "timeout_s"),
    ({"ratings_per_item": 0}, "ratings_per_item"),
    ({"simulated_noise": -0.1}, "simulated_noise"),
    ({"url": "http://127.0.0.1:8000/", "simulated_raters": 2}, "drop url"),
    ({"port": 70000}, "port"),
])
def test_config_refusals(change, message):
    with pytest.raises(ConfigError, match=message):
        check_config(Config(**change), "online")


def test_trainer_client_errors():
    with pytest.raises(FeedbackPageError, match="not an http"):
        TrainerClient("ftp://x", "k")
    client = TrainerClient("http://127.0.0.1:9/", "k", retry_s=0.3, timeout_s=1)  # port 9: nothing listens
    with pytest.raises(FeedbackPageError, match=r"unreachable for 0 s"):
        client.ratings("m")


def test_trainer_client_against_a_page(tmp_path, feedback_server):
    """The real page: the right key publishes (idempotently) and reads; a wrong key or an item of
    another mode is refused in one line, which is what the stage's check before sampling sees."""
    page = feedback_server("--db", str(tmp_path / "fb.sqlite"), env={"RLHF_FEEDBACK_TRAINER_KEY": "right-key"})
    item = Item("ignored", "compare", "sort: ba\n", ("ab", "ba"), (0, 1), "run/online", "round 0")
    client = TrainerClient(page.url, "right-key")
    assert client.publish([item]) == 1 and client.publish([item]) == 0
    assert client.ratings("run/online") == []
    with pytest.raises(FeedbackPageError, match="refused GET /api/ratings: 403 wrong or missing trainer key"):
        TrainerClient(page.url, "wrong-key").ratings("run/online")
    with pytest.raises(FeedbackPageError, match="serves compare items, not rate"):
        client.publish([Item("x", "rate", "p", ("a",), (0,), "run/online", "round 0")])


def test_a_stopped_page_is_named(tmp_path):
    page = LocalPage(tmp_path, mode="compare", db=str(tmp_path / "fb.sqlite"), database_url=None, host="127.0.0.1", port=0, ratings_per_item=1)
    page.server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    page.server.wait()
    with pytest.raises(FeedbackPageError, match=r"the feedback page stopped \(exit 3\); see .*feedback_page.log"):
        page.check()


# ------------------------------------------------------------------------------ end to end

ARGS = [
    "recipe=online_feedback", *TINY, "stages.sft.max_steps=20", "stages.online.max_steps=6",
    "stages.online.steps_per_round=2", "stages.online.batch_size=8", "stages.online.eval_prompts=0",
    "stages.online.poll_s=0.2", "trainer.checkpoint_every=1",
]


def ledger(run):
    """(rating ids each round used, every live rating in the page's database)."""
    stage = run / "stages" / "01_online"
    used = [json.loads(line)["rating_id"] for path in sorted((stage / "rounds").glob("round_*.jsonl")) for line in path.read_text().splitlines()]
    return used, FeedbackStore(stage / "feedback.sqlite").ratings()


@pytest.mark.slow
def test_killed_mid_round_resumes_with_every_rating_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_FEEDBACK_FAST_HASHING", "1")  # the simulated raters' accounts: cheap hashes
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "run", *ARGS, f"hydra.run.dir={run}"], cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    stage = run / "stages" / "01_online"
    deadline = time.time() + 240
    try:  # kill everything (trainer, page, raters) once round 1's items are out and being rated
        while not ((stage / "rounds" / "items_001.jsonl").exists() and len(FeedbackStore(stage / "feedback.sqlite").ratings()) > len(ledger(run)[0])):
            assert proc.poll() is None, "run finished before the kill point"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (stage / "COMPLETE").exists()
    before = {r.id for r in FeedbackStore(stage / "feedback.sqlite").ratings()}

    done = run_cli("run", f"resume={run}", timeout=300)
    assert (stage / "COMPLETE").exists(), done.stderr[-3000:]
    used, rows = ledger(run)
    live = {r.id for r in rows}
    assert len(used) == len(set(used)), "a rating was used twice"
    assert before <= live and set(used) <= live, "a rating was lost"
    assert set(used) >= {i for i in live if i <= max(used)}, "a rating before the last cut was skipped"
    assert max(Counter((r.rater, r.item_id) for r in rows).values()) == 1
    assert len({r.rater for r in rows}) == 4 and {r.checkpoint for r in rows} >= {"round 0", "round 1", "round 2"}
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["rounds/ratings"] == len(used) and metrics["rounds/pairs"] > 0


def test_a_round_without_any_rating_stops_resumably(cli_in_process, tmp_path, monkeypatch):
    """No rater: round 0 times out with nothing, the run stops with one line and its items
    published; resumed with raters, it goes on from that round and completes."""
    monkeypatch.setenv("RLHF_FEEDBACK_FAST_HASHING", "1")
    run = tmp_path / "run"
    proc = cli_in_process("run", *ARGS, "stages.online.simulated_raters=0", "stages.online.timeout_s=0.5",
                          f"hydra.run.dir={run}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "round 0: no rating came in within timeout_s=0.5 s" in proc.stderr and f"resume={run}" in proc.stderr
    stage = run / "stages" / "01_online"
    assert (stage / "rounds" / "items_000.jsonl").exists() and not (stage / "rounds" / "round_000.jsonl").exists()
    cli_in_process("run", f"resume={run}", "stages.online.simulated_raters=2", "stages.online.timeout_s=120")
    assert (stage / "COMPLETE").exists()
    assert json.loads((stage / "metrics.json").read_text())["rounds/pairs"] > 0
