"""Views: the page, the rate / undo posts, login, static files, and the CSRF failure answer.

A POST from htmx (header `HX-Request: true`) is answered with the fragment
(`feedback/main.html`) it swaps into `#app`; a plain form POST (no JS) with a 303 back to `/`.
The header `X-Feedback-Status` says what a write did: saved | duplicate | already_rated |
undone | nothing_to_undo.
"""

from __future__ import annotations

import hashlib
import mimetypes
import secrets

from django.conf import settings
from django.contrib.staticfiles import finders
from django.core.exceptions import SuspiciousFileOperation
from django.http import FileResponse, Http404, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from rlhf.feedback.candidates import Item
from rlhf.feedback.web import records

FLASH = {
    "saved": "Saved.",
    "duplicate": "Saved.",
    "already_rated": "You had already rated that one; your first answer was kept.",
    "undone": "Undid your last rating.",
    "nothing_to_undo": "Nothing to undo.",
}
COMPARE_BUTTONS = (  # value, label, key
    ("A", "A is better", "1"),
    ("B", "B is better", "2"),
    ("tie", "Tie", "t"),
    ("both_bad", "Both bad", "b"),
)
STAR_BUTTONS = tuple((str(i), "★" * i, str(i)) for i in range(1, 6))
THUMB_BUTTONS = (("up", "👍 Good", "u"), ("down", "👎 Bad", "d"))
UNDO_KEY = "z"


def buttons_for(mode: str, scale: str) -> tuple[tuple[str, str, str], ...]:
    if mode == "compare":
        return COMPARE_BUTTONS
    return STAR_BUTTONS if scale == "stars" else THUMB_BUTTONS


def new_id() -> str:
    return secrets.token_urlsafe(16)


def order_for(item: Item, rater: str) -> tuple[int, ...]:
    """Display order of an item's responses: a stable per-(rater, item) coin flip for A/B."""
    if len(item.responses) < 2:
        return tuple(range(len(item.responses)))
    flip = hashlib.sha256(f"{rater}\0{item.id}".encode("utf-8")).digest()[0] & 1
    return (1, 0) if flip else (0, 1)


def rater_for(request) -> str | None:
    """The logged-in account's name; else the server's default rater (`--rater`), if any."""
    if request.user.is_authenticated:
        return request.user.get_username()
    return settings.FEEDBACK.get("rater")


def _context(rater: str, flash: str | None = None, focus: str | None = None) -> dict:
    mode, scale = settings.FEEDBACK["mode"], settings.FEEDBACK["scale"]
    items = records.load_items(mode)
    rated_ids = records.rated_item_ids(rater, mode)
    todo = [it for it in items if it.id not in rated_ids]
    item = next((it for it in todo if it.id == focus), todo[0] if todo else None)
    rated = len(items) - len(todo)
    total = len(items)
    order = order_for(item, rater) if item else ()
    if item is None:
        responses = []
    elif mode == "compare":
        responses = [(label, item.responses[k]) for label, k in zip("AB", order)]
    else:
        responses = [("Response", item.responses[order[0]])]
    if mode == "compare":
        question = "Which response is better?"
    else:
        question = "How good is this response?" if scale == "stars" else "Is this response good?"
    return {
        "mode": mode, "scale": scale, "rater": rater, "item": item, "order": ",".join(map(str, order)),
        "responses": responses, "n_shown": len(responses), "question": question,
        "buttons": [(v, label, key, key.upper()) for v, label, key in buttons_for(mode, scale)],
        "rated": rated, "total": total, "total_or_1": max(total, 1),
        "pct": 100 * rated // total if total else 100,
        "flash": FLASH.get(flash or ""), "submission_id": new_id(), "undo_id": new_id(),
        "undo_key": UNDO_KEY, "undo_key_upper": UNDO_KEY.upper(),
    }


def _text(status: int, message: str) -> HttpResponse:
    return HttpResponse(message, status=status, content_type="text/plain; charset=utf-8")


@require_GET
def index(request):
    rater = rater_for(request)
    if rater is None:
        return HttpResponseRedirect(f"{settings.LOGIN_URL}?next=/")
    ctx = _context(rater, flash=request.GET.get("m"), focus=request.GET.get("item"))
    return render(request, "feedback/page.html", ctx)


def _form(request) -> dict[str, str] | HttpResponse:
    ctype = request.content_type or ""
    if ctype not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return _text(415, "Send the form as application/x-www-form-urlencoded.")
    return request.POST  # parsing a body over DATA_UPLOAD_MAX_MEMORY_SIZE raises -> 400


def _respond(request, rater: str, status: str, focus: str | None = None) -> HttpResponse:
    if request.headers.get("HX-Request") == "true":
        response = render(request, "feedback/main.html", _context(rater, flash=status, focus=focus))
    else:
        response = HttpResponseRedirect(f"/?m={status}" + (f"&item={focus}" if focus else ""))
        response.status_code = 303
    response["X-Feedback-Status"] = status
    return response


def _rater_and_form(request):
    """(rater, form) of a POST, or the response refusing it (not logged in, a bad body)."""
    rater = rater_for(request)
    if rater is None:
        return _text(403, "Log in first.")
    form = _form(request)
    return form if isinstance(form, HttpResponse) else (rater, form)


@require_POST
def rate(request):
    posted = _rater_and_form(request)
    if isinstance(posted, HttpResponse):
        return posted
    rater, form = posted
    mode = settings.FEEDBACK["mode"]
    by_id = {it.id: it for it in records.load_items(mode)}
    item = by_id.get(form.get("item_id", ""))
    if item is None:
        return _text(400, "Unknown item.")
    if form.get("choice") not in {v for v, _, _ in buttons_for(mode, settings.FEEDBACK["scale"])}:
        return _text(400, "That choice is not valid here.")
    try:
        order = tuple(int(k) for k in form.get("order", "").split(","))
        outcome = records.record(submission_id=form.get("submission_id", ""), rater=rater, item=item,
                                 choice=form["choice"], order=order)
    except ValueError as err:
        return _text(400, f"Bad request: {err}")
    return _respond(request, rater, outcome.status)


@require_POST
def undo(request):
    posted = _rater_and_form(request)
    if isinstance(posted, HttpResponse):
        return posted
    rater, form = posted
    try:
        outcome = records.undo_last(submission_id=form.get("submission_id", ""), rater=rater,
                                    mode=settings.FEEDBACK["mode"])
    except ValueError as err:
        return _text(400, f"Bad request: {err}")
    return _respond(request, rater, outcome.status, focus=outcome.item_id if outcome.status == "undone" else None)


@require_GET
def static(request, path: str):
    """The page's CSS/JS and the admin's assets, straight from the installed packages."""
    try:
        found = finders.find(path)
    except SuspiciousFileOperation:
        found = None
    if not found or path.endswith("/"):
        raise Http404(path)
    ctype = mimetypes.guess_type(found)[0] or "application/octet-stream"
    if ctype.startswith("text/") or ctype.endswith("javascript"):
        ctype += "; charset=utf-8"
    response = FileResponse(open(found, "rb"), content_type=ctype)
    response["Cache-Control"] = "no-cache"
    return response


def csrf_failure(request, reason: str = "") -> HttpResponse:
    return _text(403, "CSRF check failed: reload the page and try again.")
