"""HTML for the feedback page. Every piece of model or user text goes through `esc`.

The page is one layout (`render_page`) around one fragment (`render_main`): the status line and
the current card. The JS posts a form with fetch and swaps in the fragment the server returns;
without JS the same forms post normally and the server redirects back to `/`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from rlhf.feedback.candidates import Item

FLASH = {
    "saved": "Saved.",
    "duplicate": "Saved.",
    "already_rated": "You had already rated that one; your first answer was kept.",
    "undone": "Undid your last rating.",
    "nothing_to_undo": "Nothing to undo.",
    "rater": "Hello! Your ratings are saved under this name.",
}

COMPARE_BUTTONS = (  # value, label, key
    ("A", "A is better", "1"),
    ("B", "B is better", "2"),
    ("tie", "Tie", "t"),
    ("both_bad", "Both bad", "b"),
)
STAR_BUTTONS = tuple((str(i), '★' * i, str(i)) for i in range(1, 6))
THUMB_BUTTONS = (("up", "👍 Good", "u"), ("down", "👎 Bad", "d"))
UNDO_KEY = "z"


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


@dataclass(frozen=True)
class View:
    """What one render needs."""

    mode: str
    scale: str
    csrf: str
    rater: str | None
    item: Item | None
    order: tuple[int, ...]
    rated: int
    total: int
    submission_id: str
    undo_id: str
    flash: str | None = None
    ask_rater: bool = False


def buttons_for(mode: str, scale: str) -> tuple[tuple[str, str, str], ...]:
    if mode == "compare":
        return COMPARE_BUTTONS
    return STAR_BUTTONS if scale == "stars" else THUMB_BUTTONS


def render_page(view: View) -> str:
    rater = (
        f'<span class="who">rating as <b>{esc(view.rater)}</b> '
        f'<a href="/?change_rater=1">change</a></span>'
        if view.rater and not view.ask_rater
        else ""
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Feedback · rlhf</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/feedback.css">
<script src="/static/feedback.js" defer></script>
</head>
<body>
<header class="bar">
  <span class="brand">rlhf <b>feedback</b></span>
  <span class="pill">{esc(view.mode)}</span>
  {rater}
</header>
<div id="error" role="alert" hidden></div>
<main id="app" aria-live="polite">
{render_main(view)}
</main>
<footer class="help">{_help(view)}</footer>
</body>
</html>
"""


def _help(view: View) -> str:
    keys = " ".join(f"<kbd>{esc(k.upper())}</kbd> {esc(label)}" for _, label, k in buttons_for(view.mode, view.scale))
    return f"Keys: {keys} · <kbd>{UNDO_KEY.upper()}</kbd> undo last"


def render_main(view: View) -> str:
    """The swappable fragment: status line + current card (or the name form / done message)."""
    if view.ask_rater:
        return _rater_form(view)
    pct = 100 * view.rated // view.total if view.total else 100
    flash = f'<span class="flash">{esc(view.flash)}</span>' if view.flash else ""
    status = (
        f'<section class="status">'
        f'<progress value="{view.rated}" max="{max(view.total, 1)}" aria-label="progress"></progress>'
        f'<span class="count" data-rated="{view.rated}" data-total="{view.total}">'
        f"{view.rated} / {view.total} rated ({pct}%)</span>{flash}</section>"
    )
    body = _card(view) if view.item else _done(view)
    return status + body + _undo_form(view)


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{esc(name)}" value="{esc(value)}">'


def _card(view: View) -> str:
    item = view.item
    assert item is not None
    shown = [item.responses[k] for k in view.order]
    if view.mode == "compare":
        labels = ("A", "B")
        responses = "".join(
            f'<article class="response" data-label="{label}"><h3><span class="tag">{label}</span></h3>'
            f'<div class="text">{esc(text)}</div></article>'
            for label, text in zip(labels, shown)
        )
        question = "Which response is better?"
    else:
        responses = (
            f'<article class="response"><h3><span class="tag">Response</span></h3>'
            f'<div class="text">{esc(shown[0])}</div></article>'
        )
        question = "How good is this response?" if view.scale == "stars" else "Is this response good?"
    buttons = "".join(
        f'<button type="submit" name="choice" value="{esc(value)}" data-key="{esc(key)}">'
        f"{esc(label)} <kbd>{esc(key.upper())}</kbd></button>"
        for value, label, key in buttons_for(view.mode, view.scale)
    )
    prompt = esc(item.prompt) if item.prompt else '<span class="muted">(empty prompt)</span>'
    return (
        f'<form class="card" method="post" action="/rate" data-fetch data-item="{esc(item.id)}">'
        + _hidden("csrf", view.csrf)
        + _hidden("submission_id", view.submission_id)
        + _hidden("item_id", item.id)
        + _hidden("order", ",".join(str(k) for k in view.order))
        + f'<section class="prompt"><h2>Prompt</h2><div class="text">{prompt}</div></section>'
        + f'<div class="responses n{len(shown)}">{responses}</div>'
        + f'<div class="actions" role="group" aria-label="{esc(question)}">'
        + f'<span class="question">{esc(question)}</span>{buttons}</div>'
        + "</form>"
    )


def _done(view: View) -> str:
    return (
        '<section class="card done"><h2>All done 🎉</h2>'
        f"<p>You rated all {view.total} items. Thank you! You can close this tab.</p></section>"
    )


def _undo_form(view: View) -> str:
    disabled = "" if view.rated else " disabled"
    return (
        '<form class="undo" method="post" action="/undo" data-fetch>'
        + _hidden("csrf", view.csrf)
        + _hidden("submission_id", view.undo_id)
        + f'<button type="submit" class="quiet" data-key="{UNDO_KEY}"{disabled}>'
        f"↶ Undo my last rating <kbd>{UNDO_KEY.upper()}</kbd></button></form>"
    )


def _rater_form(view: View) -> str:
    value = esc(view.rater or "")
    return (
        '<form class="card narrow" method="post" action="/rater">'
        + _hidden("csrf", view.csrf)
        + '<h2>Who is rating?</h2><p class="muted">Your ratings are stored under this name.</p>'
        + f'<label>Name <input name="rater" value="{value}" required maxlength="64" '
        'autocomplete="nickname" autofocus></label>'
        + '<button type="submit">Start rating</button></form>'
    )


def render_error(status: int, message: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{status} · rlhf feedback</title>
<link rel="stylesheet" href="/static/feedback.css"></head>
<body><main id="app"><section class="card narrow"><h2>{status}</h2><p>{esc(message)}</p></section></main></body></html>
"""
