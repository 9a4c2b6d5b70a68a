"""Feedback page in a real browser: Debian's chromium, headless, driven by Playwright, against
the real server (`python -m rlhf feedback serve`: Django under gunicorn).

Needs /usr/bin/chromium (`apt-get install chromium`) and `pip install playwright` (never
`playwright install`: we use the system browser). `.ci/feedback_deps.sh` installs both.
Regenerate the docs screenshot with `RLHF_FEEDBACK_SCREENSHOT=docs/feedback.png pytest -m browser`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from conftest import add_raters

from rlhf.feedback.candidates import Candidate
from rlhf.feedback.export import export
from rlhf.feedback.store import FeedbackStore

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
XSS = "<script>alert(1)</script>"


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install chromium, or run .ci/feedback_deps.sh)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install playwright)"
    return None


pytestmark = [pytest.mark.browser, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def serve(tmp_path, feedback_server):
    def start(candidates, mode="compare", scale="stars", rater=None):
        cands = tmp_path / "candidates.jsonl"
        cands.write_text("".join(
            json.dumps({"prompt": c.prompt, "responses": list(c.responses), "model": c.model,
                        "checkpoint": c.checkpoint}) + "\n"
            for c in candidates
        ))
        args = ["--candidates", str(cands), "--db", str(tmp_path / "fb.sqlite"), "--mode", mode, "--scale", scale]
        return feedback_server(*args, *(["--rater", rater] if rater else []))

    return start


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.dialogs = []  # any alert() would mean injected script ran
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))  # CSP violations too
    page.posts = []  # (path, sent by htmx?)
    page.on("request", lambda r: r.method == "POST" and page.posts.append(
        (r.url.split("/", 3)[3], r.headers.get("hx-request") == "true")))
    yield page
    context.close()


def wait_count(page, rated: int, total: int) -> None:
    from playwright.sync_api import expect

    expect(page.locator(".count")).to_have_text(re.compile(rf"^{rated} / {total} rated"))
    # the page's scripts are deferred: a key pressed before the load event would find no handler
    page.wait_for_load_state("load")


def current(page) -> tuple[str, list[str]]:
    """(item id, response texts as shown) of the card on screen."""
    item = page.locator("form.card").get_attribute("data-item")
    return item, [t.text_content() for t in page.locator("article.response .text").all()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_compare_with_mouse_keyboard_and_undo(page, serve, tmp_path):
    candidates = [
        Candidate("Say hi " + XSS, ("hello " + XSS, "hi there")),
        Candidate("Count to three", ("1 2 3", "one, two")),
        Candidate("Capital of France?", ("Paris", "Lyon")),
    ]
    add_raters(["--db", str(tmp_path / "fb.sqlite")], ["bob"])
    server = serve(candidates)
    page.goto(server.url)

    # who is rating: a rater account logs in (the password submitted with Enter)
    assert page.url.endswith("/login/?next=/")
    page.get_by_label("Name").fill("bob")
    page.get_by_label("Password").fill("correct-horse")
    page.keyboard.press("Enter")
    wait_count(page, 0, 3)
    assert page.locator(".who b").text_content() == "bob"

    # item 1, with the mouse: A is better. Model text is shown as text, never run.
    id1, (a1, b1) = current(page)
    assert XSS in page.locator(".prompt .text").text_content()
    page.get_by_role("button", name="A is better").click()
    wait_count(page, 1, 3)

    # item 2, with the keyboard: B better, then undo (z) brings it back, then tie (t)
    id2, (a2, b2) = current(page)
    assert id2 != id1
    page.keyboard.press("2")
    wait_count(page, 2, 3)
    page.keyboard.press("z")
    wait_count(page, 1, 3)
    assert current(page)[0] == id2
    page.keyboard.press("t")
    wait_count(page, 2, 3)

    # item 3: mouse B, mouse undo, keyboard 1
    id3, (a3, b3) = current(page)
    page.get_by_role("button", name="B is better").click()
    wait_count(page, 3, 3)
    assert "All done" in page.locator("#app").text_content()
    page.get_by_role("button", name=re.compile("Undo my last rating")).click()
    wait_count(page, 2, 3)
    assert current(page)[0] == id3
    page.keyboard.press("1")
    wait_count(page, 3, 3)

    assert page.dialogs == [] and page.errors == []
    assert page.evaluate("typeof htmx.ajax") == "function"
    # after the login form, every post went through htmx (fragments swapped in, no page loads)
    assert page.posts[0] == ("login/", False) and all(htmx for _, htmx in page.posts[1:]), page.posts
    assert len(page.posts) == 8
    counts = export(tmp_path / "fb.sqlite", tmp_path / "out")
    assert counts == {"pairs": 2, "ties": 1, "both_bad": 0, "ratings_stars": 0, "ratings_thumbs": 0, "undone": 2}
    assert read_jsonl(tmp_path / "out" / "pairs.jsonl") == [
        {"prompt": "Say hi " + XSS, "chosen": a1, "rejected": b1},
        {"prompt": "Capital of France?", "chosen": a3, "rejected": b3},
    ]
    assert {a1, b1} == {"hello " + XSS, "hi there"} and {a3, b3} == {"Paris", "Lyon"}
    rows = FeedbackStore(tmp_path / "fb.sqlite").ratings()
    assert [(r.rater, r.item_id, r.choice) for r in rows] == [("bob", id1, "A"), ("bob", id2, "tie"), ("bob", id3, "A")]


def test_rate_thumbs_with_a_lost_response_retried(page, serve, tmp_path):
    candidates = [Candidate("Greet", ("Hello!", "Go away.", "Hi :)"))]
    server = serve(candidates, mode="rate", scale="thumbs", rater="cy")

    # The first POST reaches the server and is stored, but its response is "lost": the page
    # retries the same submission, which the server recognises, so it is stored only once.
    lost = []

    def lose_first_response(route):
        if not lost:
            route.fetch()  # the server handles the request...
            lost.append(route.request.post_data)
            route.abort("connectionreset")  # ...but the browser never sees the answer
        else:
            route.continue_()

    page.route("**/rate", lose_first_response)
    page.goto(server.url)
    wait_count(page, 0, 3)
    assert page.get_by_role("button", name=re.compile("Good")).is_visible()
    page.keyboard.press("u")  # Hello! -> up (response lost, retried)
    wait_count(page, 1, 3)
    page.unroute("**/rate")
    assert lost, "the route handler did not run"
    page.get_by_role("button", name=re.compile("Bad")).click()  # Go away. -> down
    wait_count(page, 2, 3)
    page.keyboard.press("z")
    wait_count(page, 1, 3)
    page.keyboard.press("d")  # Go away. -> down again
    wait_count(page, 2, 3)  # (keys pressed while a post is in flight are ignored, by design)
    page.keyboard.press("u")  # Hi :) -> up
    wait_count(page, 3, 3)

    # the lost answer itself is logged (by the browser and by htmx); nothing else is
    expected = re.compile(r"ERR_CONNECTION_RESET|^htmx:(afterRequest|sendError)")
    assert [e for e in page.errors if not expected.search(e)] == []
    counts = export(tmp_path / "fb.sqlite", tmp_path / "out")
    assert counts["ratings_thumbs"] == 3 and counts["undone"] == 1
    assert read_jsonl(tmp_path / "out" / "ratings.jsonl") == [
        {"prompt": "Greet", "response": "Hello!", "rating": "up"},
        {"prompt": "Greet", "response": "Go away.", "rating": "down"},
        {"prompt": "Greet", "response": "Hi :)", "rating": "up"},
    ]
    assert len(FeedbackStore(tmp_path / "fb.sqlite").ratings(include_undone=True)) == 4


def test_rate_stars_logged_in_then_log_out(page, serve, tmp_path):
    add_raters(["--db", str(tmp_path / "fb.sqlite")], ["dee"])
    server = serve([Candidate("Name a colour", ("Blue", "Seven"))], mode="rate", scale="stars")
    page.goto(server.url)
    page.get_by_label("Name").fill("dee")
    page.get_by_label("Password").fill("correct-horse")
    page.get_by_role("button", name="Start rating").click()
    wait_count(page, 0, 2)
    page.keyboard.press("5")  # Blue -> 5 stars
    wait_count(page, 1, 2)
    page.get_by_role("button", name=re.compile("^★ 1")).click()  # Seven -> 1 star, with the mouse
    wait_count(page, 2, 2)
    assert "All done" in page.locator("#app").text_content()
    page.get_by_role("button", name="log out").click()
    page.wait_for_url(re.compile(r"/login/$"))
    assert page.errors == []
    export(tmp_path / "fb.sqlite", tmp_path / "out")
    assert read_jsonl(tmp_path / "out" / "ratings.jsonl") == [
        {"prompt": "Name a colour", "response": "Blue", "rating": 5},
        {"prompt": "Name a colour", "response": "Seven", "rating": 1},
    ]
    assert {r.rater for r in FeedbackStore(tmp_path / "fb.sqlite").ratings()} == {"dee"}


@pytest.mark.skipif(not os.environ.get("RLHF_FEEDBACK_SCREENSHOT"), reason="set RLHF_FEEDBACK_SCREENSHOT=PATH.png")
def test_screenshot_for_the_docs(browser, serve):  # noqa: D103
    haiku = Candidate(
        "Write a haiku about code review.",
        ("Small diff, kind words,\nthe tests pass on the first try,\nmerge before the rain.",
         "Code review is when people look at code."),
    )
    sky = Candidate(
        "Explain in two sentences why the sky is blue.",
        (
            "Sunlight is scattered by the molecules of the air, and short (blue) wavelengths are "
            "scattered far more than long (red) ones: this is Rayleigh scattering.\n\nSo wherever "
            "you look, scattered blue light reaches your eyes from the whole sky.",
            "The sky is blue because it reflects the colour of the oceans.",
        ),
        "my-run/online", "round 3",
    )
    server = serve([haiku, sky], rater="alice")
    context = browser.new_context(viewport={"width": 1000, "height": 600}, color_scheme="light")
    page = context.new_page()
    page.goto(server.url)
    page.keyboard.press("1")  # rate the haiku, so the progress bar shows
    wait_count(page, 1, 2)
    page.screenshot(path=os.environ["RLHF_FEEDBACK_SCREENSHOT"], type="png")
    context.close()
