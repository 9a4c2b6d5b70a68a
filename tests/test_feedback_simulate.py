"""Simulated raters (rlhf/feedback/simulate.py) against the real page (`feedback serve`, gunicorn):
they log in and rate over HTTP like a person, agree with the verifier without noise, flip about
half with noise 0.5, rate items published while they wait, and survive a restart and a lost answer.
"""

from __future__ import annotations

import json
import random
import re
import string
import threading
import time

import pytest

pytest.importorskip("django")
pytest.importorskip("gunicorn")

from conftest import FeedbackServer, add_raters  # noqa: E402

from rlhf.errors import ConfigError  # noqa: E402
from rlhf.feedback.simulate import RaterError, SimulatedRater, decide, load_judge, run_raters  # noqa: E402
from rlhf.feedback.store import FeedbackStore  # noqa: E402
from rlhf.tasks.builtin import answer, verifier_reward  # noqa: E402

PASSWORD = "correct-horse"  # add_raters' default
RATERS = ["ann", "bob", "cy", "dee"]
TRICKY = '<b>"a" & b</b>\n  c '  # escaped by the page; must come back exactly

SEEN: list[tuple[str, str]] = []  # what `recording_judge` was shown


def recording_judge(prompts: list[str], responses: list[str]) -> list[float]:
    SEEN.extend(zip(prompts, responses))
    return verifier_reward(prompts, responses)


JUDGE = f"{__name__}.recording_judge"


def sort_rows(n: int, seed: int = 0) -> list[dict]:
    """Built-in task prompts ("sort: dcba\\n"), each with the right answer and a wrong one
    (reversed, or two letters swapped: partly right), in either order."""
    rng, rows, words = random.Random(seed), [], set()
    while len(rows) < n:
        word = "".join(rng.sample(string.ascii_lowercase, rng.randint(4, 8)))
        if word in words:
            continue
        words.add(word)
        prompt = f"sort: {word}\n"
        right = answer(prompt)
        wrong = right[::-1] if len(rows) % 3 else right[1] + right[0] + right[2:]
        rows.append({"prompt": prompt, "responses": [right, wrong] if len(rows) % 2 else [wrong, right]})
    return rows


def serve(feedback_server, tmp_path, rows: list[dict], raters: list[str], *args: str):
    cands = tmp_path / "c.jsonl"
    cands.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp_path / "fb.sqlite"
    add_raters(["--db", str(db)], raters)
    return feedback_server("--candidates", str(cands), "--db", str(db), *args), db


def verifier_choice(prompt: str, shown: tuple[str, ...]) -> str:
    """What the verifier says, without noise: A / B / tie (two responses shown), up / down (one)."""
    s = verifier_reward([prompt] * len(shown), list(shown))
    if len(s) == 1:
        return "up" if s[0] == 1.0 else "down"
    return "A" if s[0] > s[1] else "B" if s[1] > s[0] else "tie"


# ------------------------------------------------------------------------------------- pure


def test_decide_hand_checked():
    rng = random.Random(0)
    compare, thumbs, stars = ["A", "B", "tie", "both_bad"], ["up", "down"], ["1", "2", "3", "4", "5"]
    assert decide(compare, [1.0, 0.5], rng=rng) == ("A", False)
    assert decide(compare, [0.25, 1.0], rng=rng) == ("B", False)
    assert decide(compare, [0.5, 0.5], rng=rng) == ("tie", False)
    assert decide(compare, [1.0, 0.5], noise=1.0, rng=rng) == ("B", True)
    assert decide(compare, [0.5, 0.5], noise=1.0, rng=rng) == ("tie", False)  # a tie stays a tie
    assert decide(thumbs, [1.0], rng=rng) == ("up", False)
    assert decide(thumbs, [0.99], rng=rng) == ("down", False)
    assert decide(thumbs, [0.6], good=0.5, rng=rng) == ("up", False)
    assert decide(thumbs, [1.0], noise=1.0, rng=rng) == ("down", True)
    # stars: 1 + 4 * score, half up (0.375 -> 2.5 -> 3, where round() would give 2)
    for score, star in [(0.0, "1"), (0.2, "2"), (0.375, "3"), (0.5, "3"), (0.625, "4"), (0.9, "5"), (1.0, "5")]:
        assert decide(stars, [score], rng=rng) == (star, False), score
    flipped = {decide(stars, [1.0], noise=1.0, rng=rng)[0] for _ in range(200)}
    assert flipped == {"1", "2", "3", "4"}  # any other star
    # seeded: the same generator gives the same judgements
    runs = [[decide(compare, [1.0, 0.0], noise=0.3, rng=r) for _ in range(30)] for r in (random.Random(7), random.Random(7))]
    assert runs[0] == runs[1] and {flip for _, flip in runs[0]} == {True, False}
    with pytest.raises(RaterError, match="buttons"):
        decide(["yes", "no"], [1.0], rng=rng)


def test_bad_arguments_name_the_culprit():
    with pytest.raises(ValueError, match=r"noise=1\.5"):
        run_raters("http://127.0.0.1:1/", ["ann"], PASSWORD, noise=1.5)
    with pytest.raises(ValueError, match="noise=nan"):
        run_raters("http://127.0.0.1:1/", ["ann"], PASSWORD, noise=float("nan"))
    with pytest.raises(ConfigError, match="judge='rlhf.nope.fn'"):
        load_judge("rlhf.nope.fn")
    with pytest.raises(ValueError, match="url 'localhost:8000'"):
        SimulatedRater("localhost:8000", "ann", PASSWORD, verifier_reward)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rater = SimulatedRater(f"http://127.0.0.1:{port}/", "ann", PASSWORD, verifier_reward, tries=2, backoff_s=0.01)
    with pytest.raises(RaterError, match=rf"GET /login/ on 127.0.0.1:{port} failed 2 times \(ConnectionRefusedError"):
        rater.run()


# ------------------------------------------------------------------------ the real page

CLEAN, NOISY, CLI = RATERS, ["n1", "n2", "n3", "n4"], ["cli1", "cli2"]
COMPARE_ROWS = sort_rows(19) + [{"prompt": "sort: dcba\n", "responses": ["abcd", TRICKY]}]


@pytest.fixture(scope="module")
def compare_page(tmp_path_factory):
    """One compare page (20 items) for the tests below, each with its own rater accounts:
    a server and its accounts cost ~1.5 s to set up and take down. -> (url, database)"""
    tmp = tmp_path_factory.mktemp("sim")
    cands, db = tmp / "c.jsonl", tmp / "fb.sqlite"
    cands.write_text("".join(json.dumps(r) + "\n" for r in COMPARE_ROWS))
    add_raters(["--db", str(db)], CLEAN + NOISY + CLI + ["lossy"])
    server = FeedbackServer("--candidates", str(cands), "--db", str(db))
    yield server.url, db
    server.stop()


def stored_by(db, raters: list[str]):
    return [r for r in FeedbackStore(db).ratings(include_undone=True) if r.rater in raters and r.mode == "compare"]


def test_four_raters_agree_with_the_verifier(compare_page):
    url, db = compare_page
    SEEN.clear()
    counts = run_raters(url, CLEAN, PASSWORD, judge=JUDGE, idle_exit_s=0)
    assert {name: dict(c) for name, c in counts.items()} == {
        name: {"saved": 20, "duplicate": 0, "already_rated": 0, "flipped": 0} for name in CLEAN}
    stored = stored_by(db, CLEAN)
    assert len(stored) == 80 and len({(r.rater, r.item_id) for r in stored}) == 80  # each item once per rater
    assert len({r.item_id for r in stored}) == 20
    for r in stored:
        assert r.choice == verifier_choice(r.prompt, r.shown), r
    assert {r.choice for r in stored} == {"A", "B"}  # both positions win: the A/B order shown is followed
    # the judge saw the texts exactly: the prompts' final newline, unescaped markup, inner spaces
    assert set(SEEN) == {(row["prompt"], text) for row in COMPARE_ROWS for text in row["responses"]}
    assert len(SEEN) == 2 * 80


def test_noise_half_flips_about_half_and_counts_match_the_store(compare_page):
    url, db = compare_page
    counts = run_raters(url, NOISY, PASSWORD, noise=0.5, seed=3, idle_exit_s=0)
    stored = stored_by(db, NOISY)
    assert len(stored) == 80
    for name in NOISY:
        disagree = sum(r.choice != verifier_choice(r.prompt, r.shown) for r in stored if r.rater == name)
        assert counts[name]["flipped"] == disagree, name
    flipped = sum(c["flipped"] for c in counts.values())
    assert 20 <= flipped <= 60, flipped  # Binomial(80, 0.5): 40 +- 4.5


def test_cli_simulate_and_a_wrong_password(compare_page, capfd, monkeypatch):
    from rlhf.feedback.cli import main

    url, db = compare_page
    monkeypatch.setenv("RLHF_FEEDBACK_PASSWORD", PASSWORD)
    argv = ["simulate", "--url", url, "--rater", "cli1,cli2", "--password-env", "--idle-exit", "0"]
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert out.splitlines() == ["rater cli1: saved 20 (flipped 0), already rated 0",
                                "rater cli2: saved 20 (flipped 0), already rated 0"]
    assert len(stored_by(db, CLI)) == 40

    monkeypatch.setenv("RLHF_FEEDBACK_PASSWORD", "not-the-password")
    assert main(argv) == 2
    out, err = capfd.readouterr()
    [line] = err.splitlines()
    assert re.fullmatch(r"error: rater 'cli[12]': login at 127\.0\.0\.1:\d+ failed: wrong name or password", line), line


def test_a_lost_answer_is_sent_again_with_the_same_submission_id(compare_page, monkeypatch):
    url, db = compare_page
    sent: list[bytes] = []
    real_send = SimulatedRater._send

    def lossy_send(self, method, path, body, headers):
        answer_ = real_send(self, method, path, body, headers)  # the page stores it ...
        if path == "/rate":
            sent.append(body)
            if len(sent) == 2:
                raise ConnectionResetError("answer lost")  # ... but the answer never arrives
        return answer_

    monkeypatch.setattr(SimulatedRater, "_send", lossy_send)
    rater = SimulatedRater(url, "lossy", PASSWORD, verifier_reward, idle_exit_s=0, backoff_s=0.01)
    assert rater.run() == {"saved": 19, "duplicate": 1, "already_rated": 0, "flipped": 0}
    assert len(sent) == 21 and sent[1] == sent[2]  # the very same form, submission id and all
    assert len(stored_by(db, ["lossy"])) == 20


def test_thumbs_agree_with_the_verifier(compare_page, tmp_path, feedback_server):
    """Rate mode, on a second page over the same database (its accounts; items by mode)."""
    url, db = compare_page
    cands = tmp_path / "rate.jsonl"
    cands.write_text("".join(json.dumps(r) + "\n" for r in sort_rows(6, seed=1)))
    server = feedback_server("--candidates", str(cands), "--db", str(db), "--mode", "rate", "--scale", "thumbs")
    counts = run_raters(server.url, CLEAN[:2], PASSWORD, idle_exit_s=0)
    assert [c["saved"] for c in counts.values()] == [12, 12]
    stored = [r for r in FeedbackStore(db).ratings() if r.mode == "rate"]
    assert len(stored) == 24 and len({(r.rater, r.item_id) for r in stored}) == 24
    for r in stored:
        assert r.choice == verifier_choice(r.prompt, r.shown), r
    assert sorted(r.choice for r in stored) == ["down"] * 12 + ["up"] * 12


def test_new_items_and_a_restart(tmp_path, feedback_server):
    """Raters that wait rate items published later (by another `serve` on the same database),
    and carry on after the page restarts on its port (new secret key: they log in again), here
    with a token in the URL."""
    batches = [sort_rows(3, seed=5), sort_rows(6, seed=6)[3:], sort_rows(9, seed=7)[6:]]
    token = ["--token", "a-token-long-enough-1234"]
    server, db = serve(feedback_server, tmp_path, batches[0], RATERS[:2], *token)
    url = re.search(r"http://\S+", server.lines[1]).group(0)
    assert url.endswith("/?token=a-token-long-enough-1234")
    stop = threading.Event()
    raters = [SimulatedRater(url, name, PASSWORD, verifier_reward, poll_s=0.1, idle_exit_s=30,
                             max_ratings=9, stop=stop, backoff_s=0.05) for name in RATERS[:2]]
    threads = [threading.Thread(target=r.run) for r in raters]
    for t in threads:
        t.start()

    def rated(n: int) -> None:
        deadline = time.monotonic() + 20
        while not all(r.counts["saved"] + r.counts["duplicate"] >= n for r in raters):
            assert time.monotonic() < deadline and all(t.is_alive() for t in threads), [r.counts for r in raters]
            time.sleep(0.05)

    try:
        rated(3)
        more = tmp_path / "more.jsonl"
        more.write_text("".join(json.dumps(r) + "\n" for r in batches[1]))
        feedback_server("--candidates", str(more), "--db", str(db)).stop()  # publishes, then goes
        rated(6)
        port = server.url.rsplit(":", 1)[1].strip("/")
        server.stop()
        more.write_text("".join(json.dumps(r) + "\n" for r in batches[2]))
        feedback_server("--candidates", str(more), "--db", str(db), "--port", port, *token)
        for t in threads:
            t.join(timeout=30)
    finally:
        stop.set()
    assert not any(t.is_alive() for t in threads)
    assert [r.counts["saved"] + r.counts["duplicate"] for r in raters] == [9, 9]
    stored = FeedbackStore(db).ratings()
    assert len(stored) == 18 and len({(r.rater, r.item_id) for r in stored}) == 18
    assert all(r.choice == verifier_choice(r.prompt, r.shown) for r in stored)

