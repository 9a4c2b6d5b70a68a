"""Readers for local data files: SFT examples, preference pairs, ratings and raw text.

Data specs
    Every reader takes a *spec*: a path, a glob (``data/*.jsonl``, ``data/**/*.jsonl.gz``) or a
    list of either (any non-str iterable, so OmegaConf ``ListConfig`` works). ``expand_paths``
    turns it into a sorted, de-duplicated list of files.

Files
    ``.jsonl`` or ``.jsonl.gz`` (gzip is read transparently), UTF-8 (a leading BOM is accepted),
    one JSON object per line; blank lines are skipped. ``read_raw_text`` also takes ``.txt`` /
    ``.txt.gz`` files, each file one document. Unknown keys in a row are ignored.

Row formats
    SFT          ``{"prompt": str, "response" | "completion": str}``, or as message lists
                 ``{"prompt": [messages], "completion": [assistant messages]}``, or a conversation
                 ``{"messages": [messages]}``: one example per assistant turn, its prompt the
                 turns before it (so only assistant turns are trained on; trailing user turns
                 are ignored)
    Preference   ``{"prompt": str, "chosen": str, "rejected": str}``, or an hh-rlhf transcript pair
                 ``{"chosen": str, "rejected": str}`` (see ``split_transcript_pair``); or as
                 message lists ``{"prompt": [messages], "chosen": [assistant messages],
                 "rejected": [...]}``, or two conversations ``{"chosen": [messages], "rejected":
                 [messages]}`` whose shared leading messages are the prompt (see
                 ``split_conversation_pair``)
    Rating       ``{"prompt": str, "response": str, "rating": 1..5 | "up" | "down" | true | false}``
                 1-5 stars -> label 0..4 (num_levels 5); thumbs down/up or false/true -> 0/1
                 (num_levels 2). All files read in one call must use the same scale. Also TRL's
                 unpaired preference ``{"prompt", "completion", "label": bool}``, strings or
                 message lists.
    Raw text     ``{"text": str}``

    These are TRL's standard and conversational formats. A message is ``{"role": "system" |
    "user" | "assistant", "content": str}`` (other keys are ignored); a list is never empty.
    Message lists are rendered to text by ``rlhf.data.chat``: the checkpoint's chat template on
    the Hugging Face backend, else the plain hh-rlhf layout ("\\n\\nHuman: ..." /
    "\\n\\nAssistant: ..."). The readers take it as ``chat=rlhf.data.chat.renderer_for(tokenizer)``.

    Prompts may be empty strings; responses (and chosen/rejected, and every assistant message
    trained on) must contain non-whitespace.

Bad rows
    Invalid JSON or UTF-8, a row that is not an object, a missing key, a wrong type, an empty
    response, an out-of-range rating, an unknown role, a string mixed with message lists, a
    conversation with no assistant message, a chat template that fails or cannot be split
    (``rlhf.data.chat.ChatError``)... With ``skip_bad_rows=False`` (the default) the first bad
    row raises ``DataError("path:line: what is wrong")``. With ``skip_bad_rows=True`` bad rows are
    dropped and ONE warning is logged on the ``rlhf`` logger giving the count and the first bad
    row's ``path:line``; if no row at all survives, ``DataError`` is raised. Pass ``stats={}`` to
    get ``stats["read"]`` (rows kept) and ``stats["skipped"]`` (rows dropped) back.

Streaming
    ``read_sft_examples``, ``read_preference_pairs``, ``read_ratings`` (and ``read_rows``) return
    lists; their ``stream_*`` twins yield the same items one at a time, for callers that keep less
    than the text (the stages keep encoded tokens, ``rlhf.data.token_store``). A bad row raises
    when the stream reaches it; ``stats``, the warning and the no-rows error come at its end.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from rlhf.data.chat import ASSISTANT, HUMAN, PLAIN, ROLES, ChatError, Renderer, split_reply
from rlhf.data.examples import PreferencePair, Rating, SFTExample
from rlhf.errors import ConfigError, DataError

__all__ = [
    "ASSISTANT",
    "HUMAN",
    "expand_paths",
    "read_preference_pairs",
    "read_ratings",
    "read_raw_text",
    "read_sft_examples",
    "split_conversation_pair",
    "split_train_valid",
    "split_transcript_pair",
    "stream_preference_pairs",
    "stream_ratings",
    "stream_rows",
    "stream_sft_examples",
]

log = logging.getLogger("rlhf")

T = TypeVar("T")
_GLOB_CHARS = set("*?[")


class BadRow(Exception):
    """Raised by a row parser; the reader turns it into `DataError("path:line: msg")`."""


# --------------------------------------------------------------------------------------- paths


def expand_paths(spec: str | Path | Iterable[str | Path]) -> list[Path]:
    """Resolve a path, a glob, or a list of either into a sorted, de-duplicated list of files.

    Raises `DataError` naming the spec when a plain path does not exist, is a directory, or a
    glob matches no file.
    """
    if isinstance(spec, (str, Path)):
        items = [spec]
    else:
        try:
            items = list(spec)
        except TypeError:
            raise DataError(f"data spec {spec!r} is not a path, a glob or a list of them") from None
        if not items:
            raise DataError("data spec is an empty list: give at least one path or glob")
    found: dict[Path, Path] = {}
    for item in items:
        if not isinstance(item, (str, Path)):
            raise DataError(f"data spec entry {item!r} is not a path or a glob")
        text = os.path.expanduser(str(item))
        if not text.strip():
            raise DataError("data spec entry is an empty string")
        if _GLOB_CHARS & set(text):
            matches = [Path(m) for m in glob.glob(text, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise DataError(f"{item}: no data file matches this glob")
        else:
            path = Path(text)
            if path.is_dir():
                raise DataError(f"{item}: is a directory; give a glob such as '{item}/*.jsonl'")
            if not path.is_file():
                raise DataError(f"{item}: data file not found")
            matches = [path]
        for path in matches:
            found.setdefault(path.resolve(), path)
    return sorted(found.values(), key=lambda p: str(p))


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def _check_suffix(path: Path, allowed: tuple[str, ...]) -> None:
    if not _suffix(path).endswith(allowed):
        kinds = ", ".join(f"{a}[.gz]" for a in allowed)
        raise DataError(f"{path}: unsupported file type (expected {kinds})")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


# ----------------------------------------------------------------------------------- row loop


def _iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield `(lineno, parsed JSON or BadRow)` for every non-blank line of a JSONL file."""
    try:
        with _open_binary(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    yield lineno, BadRow(f"not valid UTF-8 ({err.reason} at byte {err.start})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    yield lineno, BadRow(f"invalid JSON ({err.msg} at column {err.colno})")
    except (gzip.BadGzipFile, zlib.error, EOFError) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def read_rows(spec, parse: Callable[[Any], T], **options) -> list[T]:
    """Every row of `stream_rows(spec, parse, **options)` in a list."""
    return list(stream_rows(spec, parse, **options))


def stream_rows(
    spec,
    parse: Callable[[Any], T],
    *,
    skip_bad_rows: bool,
    stats: dict | None,
    what: str,
    allowed: tuple[str, ...] = (".jsonl",),
    reader: Callable[[Path], Iterator[tuple[int, Any]]] = _iter_rows,
) -> Iterator[T]:
    """`read_rows` one row at a time, so a caller that keeps less than the parsed rows (the
    encoded tokens, rlhf.data.token_store) never holds them all. The spec and file types are
    checked now; bad rows raise (or are counted) as they come, and `stats`, the skipped-rows
    warning and the no-rows `DataError` come when the iterator is exhausted."""
    paths = expand_paths(spec)
    for path in paths:
        _check_suffix(path, allowed)
    return _parsed_rows(paths, parse, skip_bad_rows, stats, what, reader)


def _parsed_rows(paths, parse, skip_bad_rows, stats, what, reader) -> Iterator:
    kept = 0
    skipped, first_bad = 0, None
    for path in paths:
        for lineno, row in reader(path):
            try:
                if isinstance(row, BadRow):
                    raise row
                item = parse(row)
            except BadRow as err:
                if not skip_bad_rows:
                    raise DataError(f"{path}:{lineno}: {err}") from None
                skipped += 1
                if first_bad is None:
                    first_bad = f"{path}:{lineno}: {err}"
                continue
            kept += 1
            yield item
    if stats is not None:
        stats["read"] = kept
        stats["skipped"] = skipped
    where = ", ".join(str(p) for p in paths)
    if not kept:
        if skipped:
            raise DataError(f"every row ({skipped}) was bad in {where}; first: {first_bad}")
        raise DataError(f"{where}: no {what} rows found (empty files?)")
    if skipped:
        log.warning(
            "skipped %d bad %s row(s) of %d in %s; first: %s",
            skipped, what, skipped + kept, where, first_bad,
        )


def require_object(row: Any) -> dict:
    if not isinstance(row, dict):
        raise BadRow(f"row is a JSON {_json_type(row)}, expected an object")
    return row


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _get_str(row: dict, key: str, *, nonempty: bool) -> str:
    if key not in row:
        raise BadRow(f"missing key {key!r} (keys: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"{key!r} must be a string, got a JSON {_json_type(value)}")
    if nonempty and not value.strip():
        raise BadRow(f"{key!r} is empty")
    return value


# ------------------------------------------------------------------------------ conversations


def _get_messages(row: dict, key: str, *, replies: bool = False) -> list[dict]:
    """`row[key]` as a non-empty list of {"role", "content"} messages (other keys dropped).

    With `replies`, every message must be a non-blank assistant message (what a reply is).
    """
    if key not in row:
        raise BadRow(f"missing key {key!r} (keys: {sorted(row)})")
    value = row[key]
    if not isinstance(value, list):
        raise BadRow(f"{key!r} must be a list of messages, got a JSON {_json_type(value)}")
    if not value:
        raise BadRow(f"{key!r} is an empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRow(f"{key}[{i}] is a JSON {_json_type(message)}, expected a {{\"role\", \"content\"}} object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRow(f"{key}[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRow(f"{key}[{i}] content must be a string, got a JSON {_json_type(content)}")
        if replies and role != "assistant":
            raise BadRow(f"{key}[{i}] is a {role} message; {key!r} may hold assistant messages only")
        if replies and not content.strip():
            raise BadRow(f"{key}[{i}] (assistant) is empty")
        messages.append({"role": role, "content": content})
    return messages


def _conversational(row: dict, keys: tuple[str, ...]) -> bool:
    """True if the row's `keys` hold message lists, False if none does; a mix is a `BadRow`."""
    lists = [k for k in keys if isinstance(row.get(k), list)]
    if not lists or len(lists) == len(keys):
        return bool(lists)
    other = next(k for k in keys if k not in lists)
    if other not in row:
        raise BadRow(f"missing key {other!r} (keys: {sorted(row)})")
    names = ", ".join(repr(k) for k in keys)
    raise BadRow(f"{lists[0]!r} is a message list but {other!r} is not: give {names} all as strings or all as message lists")


def _split(chat: Renderer, prompt: list[dict], reply: list[dict]) -> tuple[str, str]:
    try:
        return split_reply(chat, prompt, reply)
    except ChatError as err:
        raise BadRow(str(err)) from None


def _prompt_and_replies(row: dict, keys: tuple[str, ...], chat: Renderer) -> tuple[str, list[str]]:
    """(prompt text, [response text per key]) for `{"prompt": [messages], key: [assistant messages]...}`."""
    prompt = _get_messages(row, "prompt")
    texts = [_split(chat, prompt, _get_messages(row, key, replies=True)) for key in keys]
    return texts[0][0], [response for _, response in texts]


# --------------------------------------------------------------------------------------- SFT


def parse_sft(row: Any, chat: Renderer = PLAIN) -> list[SFTExample]:
    """The row's examples: one, or one per assistant turn of a `{"messages"}` conversation."""
    row = require_object(row)
    if "messages" in row:
        messages = _get_messages(row, "messages")
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise BadRow("'messages' has no assistant message to train on")
        for i in turns:
            if not messages[i]["content"].strip():
                raise BadRow(f"messages[{i}] (assistant) is empty")
        # one example per assistant turn, its prompt everything before it: the stages mask prompt
        # tokens, so this trains on assistant tokens only (re-encoding the shared prefix per turn)
        return [SFTExample(*_split(chat, messages[:i], messages[i : i + 1])) for i in turns]
    key = "completion" if "completion" in row else "response"
    if _conversational(row, ("prompt", key)):
        prompt, (response,) = _prompt_and_replies(row, (key,), chat)
        return [SFTExample(prompt=prompt, response=response)]
    return [SFTExample(prompt=_get_str(row, "prompt", nonempty=False), response=_get_str(row, key, nonempty=True))]


def read_sft_examples(
    spec, skip_bad_rows: bool = False, stats: dict | None = None, *, chat: Renderer | None = None
) -> list[SFTExample]:
    """Read SFT rows: `{"prompt", "response" | "completion"}` as strings or message lists, or `{"messages"}`.

    Message lists are rendered with `chat` (`rlhf.data.chat.renderer_for(tokenizer)`; None: the
    plain template). A `{"messages"}` row gives one example per assistant turn (trailing user
    turns are ignored); `stats` counts rows, not examples.
    """
    return list(stream_sft_examples(spec, skip_bad_rows, stats, chat=chat))


def stream_sft_examples(
    spec, skip_bad_rows: bool = False, stats: dict | None = None, *, chat: Renderer | None = None
) -> Iterator[SFTExample]:
    """`read_sft_examples` one example at a time (see `stream_rows`)."""
    chat = chat or PLAIN
    rows = stream_rows(spec, lambda row: parse_sft(row, chat), skip_bad_rows=skip_bad_rows, stats=stats, what="SFT")
    return (example for examples in rows for example in examples)


# -------------------------------------------------------------------------------- preferences


def split_transcript_pair(chosen: str, rejected: str) -> PreferencePair:
    """Split two hh-rlhf transcripts into `(prompt, chosen, rejected)`.

    The prompt is the longest common prefix of the two transcripts cut back to just after its
    last "\\n\\nAssistant:"; so it ends with "\\n\\nAssistant:" and the responses are what follows,
    KEEPING their leading space (``prompt + chosen_response == chosen`` exactly, which is also
    how a byte-level tokenizer sees running text). Raises `BadRow` for identical pairs, a
    transcript without an "\\n\\nAssistant:" turn, no shared prefix up to such a turn, an
    empty response, or transcripts that differ before their last Assistant turn (a response
    holding a "\\n\\nHuman:" turn): a pair compares two answers to one prompt, not two prompts.
    """
    if chosen == rejected:
        raise BadRow("chosen and rejected are identical")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if ASSISTANT not in text:
            raise BadRow(f"{name} transcript has no '\\n\\nAssistant:' turn")
    n = min(len(chosen), len(rejected))
    common = 0
    while common < n and chosen[common] == rejected[common]:
        common += 1
    cut = chosen.rfind(ASSISTANT, 0, common)
    if cut < 0 or cut + len(ASSISTANT) > common:
        raise BadRow("chosen and rejected share no prefix ending in '\\n\\nAssistant:'")
    end = cut + len(ASSISTANT)
    pair = PreferencePair(prompt=chosen[:end], chosen=chosen[end:], rejected=rejected[end:])
    for name in ("chosen", "rejected"):
        if not getattr(pair, name).strip():
            raise BadRow(f"{name} response after the last shared '\\n\\nAssistant:' is empty")
        if HUMAN in getattr(pair, name):
            raise BadRow(
                f"the transcripts differ before their last '\\n\\nAssistant:' turn (the {name} response holds a "
                "'\\n\\nHuman:' turn): a pair must compare two answers to the same conversation"
            )
    return pair


def split_conversation_pair(chosen: list[dict], rejected: list[dict], chat: Renderer = PLAIN) -> PreferencePair:
    """Split two conversations (message lists) with an implicit prompt into a pair.

    The prompt is their shared leading messages; what follows in each must be assistant messages
    only, the two answers (rendered with `chat`, see `rlhf.data.chat.split_reply`). Raises
    `BadRow` for identical conversations, a side with nothing after the shared messages, or sides
    that differ before their final assistant messages (a pair compares two answers to one
    conversation, as in `split_transcript_pair`).
    """
    if chosen == rejected:
        raise BadRow("chosen and rejected are identical")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) == shared:
            raise BadRow(f"{name} has no message after the {shared} it shares with the other side")
        for i in range(shared, len(messages)):
            if messages[i]["role"] != "assistant":
                raise BadRow(
                    f"the conversations differ before their final assistant message(s) ({name}[{i}] is a "
                    f"{messages[i]['role']} message): a pair must compare two answers to the same conversation"
                )
            if not messages[i]["content"].strip():
                raise BadRow(f"{name}[{i}] (assistant) is empty")
    prompt, chosen_text = _split(chat, chosen[:shared], chosen[shared:])
    _, rejected_text = _split(chat, chosen[:shared], rejected[shared:])
    return PreferencePair(prompt=prompt, chosen=chosen_text, rejected=rejected_text)


def parse_pair(row: Any, chat: Renderer = PLAIN) -> PreferencePair:
    row = require_object(row)
    if "prompt" in row:
        if _conversational(row, ("prompt", "chosen", "rejected")):
            prompt, (chosen, rejected) = _prompt_and_replies(row, ("chosen", "rejected"), chat)
        else:
            prompt = _get_str(row, "prompt", nonempty=False)
            chosen = _get_str(row, "chosen", nonempty=True)
            rejected = _get_str(row, "rejected", nonempty=True)
        if chosen == rejected:
            raise BadRow("chosen and rejected are identical")
        return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)
    if _conversational(row, ("chosen", "rejected")):
        return split_conversation_pair(_get_messages(row, "chosen"), _get_messages(row, "rejected"), chat)
    chosen = _get_str(row, "chosen", nonempty=True)
    rejected = _get_str(row, "rejected", nonempty=True)
    return split_transcript_pair(chosen, rejected)


def read_preference_pairs(
    spec, skip_bad_rows: bool = False, stats: dict | None = None, *, chat: Renderer | None = None
) -> list[PreferencePair]:
    """Read `{"prompt", "chosen", "rejected"}` rows or `{"chosen", "rejected"}` rows with an implicit prompt.

    Each side is a string or a message list. Implicit-prompt strings are hh-rlhf transcripts
    (`split_transcript_pair`), message lists conversations (`split_conversation_pair`). Message
    lists are rendered with `chat` (`rlhf.data.chat.renderer_for(tokenizer)`; None: the plain
    template). All formats may be mixed, even within one file.
    """
    return list(stream_preference_pairs(spec, skip_bad_rows, stats, chat=chat))


def stream_preference_pairs(
    spec, skip_bad_rows: bool = False, stats: dict | None = None, *, chat: Renderer | None = None
) -> Iterator[PreferencePair]:
    """`read_preference_pairs` one pair at a time (see `stream_rows`)."""
    chat = chat or PLAIN
    return stream_rows(
        spec, lambda row: parse_pair(row, chat), skip_bad_rows=skip_bad_rows, stats=stats, what="preference"
    )


# ------------------------------------------------------------------------------------ ratings

_THUMBS = {"up": 1, "down": 0}


def _parse_rating_value(value: Any) -> tuple[int, int]:
    """-> (label, num_levels)."""
    if isinstance(value, bool):
        return int(value), 2
    if isinstance(value, int):
        if 1 <= value <= 5:
            return value - 1, 5
        raise BadRow(f"rating {value} is out of range 1-5")
    if isinstance(value, str) and value.strip().lower() in _THUMBS:
        return _THUMBS[value.strip().lower()], 2
    raise BadRow(f"rating must be an integer 1-5, 'up'/'down' or true/false, got {value!r}")


def _rating_label(row: dict) -> tuple[int, int]:
    """(label, num_levels) from "rating", or from TRL's unpaired-preference boolean "label"."""
    if "rating" in row:
        return _parse_rating_value(row["rating"])
    if "label" in row:
        if not isinstance(row["label"], bool):
            raise BadRow(f"'label' must be true or false, got {row['label']!r}")
        return int(row["label"]), 2
    raise BadRow(f"missing key 'rating' (keys: {sorted(row)})")


def read_ratings(
    spec, skip_bad_rows: bool = False, stats: dict | None = None, *, chat: Renderer | None = None
) -> list[Rating]:
    """Read `{"prompt", "response" | "completion", "rating" | "label"}` rows (see `stream_ratings`)."""
    return list(stream_ratings(spec, skip_bad_rows, stats, chat=chat))


def stream_ratings(
    spec, skip_bad_rows: bool = False, stats: dict | None = None, *, chat: Renderer | None = None
) -> Iterator[Rating]:
    """Read `{"prompt", "response" | "completion", "rating" | "label"}` rows, one at a time (`stream_rows`).

    Prompt and response are strings, or message lists rendered with `chat` (None: the plain
    template; the response then holds assistant messages only). 1-5 stars -> label 0..4 with
    num_levels 5; "up"/"down" or true/false -> 1/0 with num_levels 2; TRL's boolean "label" is
    the latter. Mixing the two scales in the files read raises `DataError` (even with
    `skip_bad_rows`).
    """
    chat = chat or PLAIN
    first_of_scale: dict[int, str] = {}
    where = {"loc": ""}

    def parse(row: Any) -> Rating:
        row = require_object(row)
        key = "completion" if "completion" in row else "response"
        if _conversational(row, ("prompt", key)):
            prompt, (response,) = _prompt_and_replies(row, (key,), chat)
        else:
            prompt = _get_str(row, "prompt", nonempty=False)
            response = _get_str(row, key, nonempty=True)
        label, levels = _rating_label(row)
        first_of_scale.setdefault(levels, where["loc"])
        if len(first_of_scale) > 1:
            stars, thumbs = first_of_scale[5], first_of_scale[2]
            raise DataError(
                f"{where['loc']}: ratings mix two scales: 1-5 stars (first at {stars}) and "
                f"thumbs up/down (first at {thumbs}); use one scale per dataset"
            )
        return Rating(prompt=prompt, response=response, label=label, num_levels=levels)

    def reader(path: Path) -> Iterator[tuple[int, Any]]:
        for lineno, row in _iter_rows(path):
            where["loc"] = f"{path}:{lineno}"
            yield lineno, row

    return stream_rows(
        spec, parse, skip_bad_rows=skip_bad_rows, stats=stats, what="rating", reader=reader
    )


# ----------------------------------------------------------------------------------- raw text


def _parse_text(row: Any) -> str:
    row = require_object(row)
    return _get_str(row, "text", nonempty=True)


def read_raw_text(spec) -> list[str]:
    """Read documents: each `.txt[.gz]` file is one document, each `.jsonl[.gz]` row `{"text"}` one.

    Any bad row or an empty `.txt` file raises `DataError`.
    """

    def reader(path: Path) -> Iterator[tuple[int, Any]]:
        if _suffix(path).endswith(".txt"):
            try:
                with _open_binary(path) as fh:
                    data = fh.read()
            except (gzip.BadGzipFile, zlib.error, EOFError) as err:
                raise DataError(f"{path}: not a readable gzip file ({err})") from None
            except OSError as err:
                raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                line = data[: err.start].count(b"\n") + 1
                yield line, BadRow(f"not valid UTF-8 ({err.reason})")
                return
            if not text.strip():
                yield 1, BadRow("text file is empty")
                return
            yield 1, {"text": text}
        else:
            yield from _iter_rows(path)

    return read_rows(
        spec, _parse_text, skip_bad_rows=False, stats=None, what="text",
        allowed=(".jsonl", ".txt"), reader=reader,
    )


# -------------------------------------------------------------------------------------- split


def split_train_valid(items: list[T], valid_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministically shuffle `items` with `seed` and split off `valid_fraction` of them.

    The validation part has `round(len * valid_fraction)` items, at least 1 when the fraction is
    positive, and never all of them (the training part keeps at least 1). Both parts come back in
    the shuffled order; the input list is not modified.
    """
    if not isinstance(valid_fraction, (int, float)) or not 0.0 <= valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")
    items = list(items)
    n = len(items)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_valid = int(round(n * valid_fraction))
    if n < 2:
        n_valid = 0
    elif valid_fraction > 0:
        n_valid = min(max(n_valid, 1), n - 1)
    valid = [items[i] for i in order[:n_valid]]
    train = [items[i] for i in order[n_valid:]]
    return train, valid
