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
    SFT          ``{"prompt": str, "response": str}``
    Preference   ``{"prompt": str, "chosen": str, "rejected": str}``, or an hh-rlhf transcript pair
                 ``{"chosen": str, "rejected": str}`` (see ``split_transcript_pair``)
    Rating       ``{"prompt": str, "response": str, "rating": 1..5 | "up" | "down" | true | false}``
                 1-5 stars -> label 0..4 (num_levels 5); thumbs down/up or false/true -> 0/1
                 (num_levels 2). All files read in one call must use the same scale.
    Raw text     ``{"text": str}``

    Prompts may be empty strings; responses (and chosen/rejected) must contain non-whitespace.

Bad rows
    Invalid JSON or UTF-8, a row that is not an object, a missing key, a wrong type, an empty
    response, an out-of-range rating... With ``skip_bad_rows=False`` (the default) the first bad
    row raises ``DataError("path:line: what is wrong")``. With ``skip_bad_rows=True`` bad rows are
    dropped and ONE warning is logged on the ``rlhf`` logger giving the count and the first bad
    row's ``path:line``; if no row at all survives, ``DataError`` is raised. Pass ``stats={}`` to
    get ``stats["read"]`` (rows kept) and ``stats["skipped"]`` (rows dropped) back.
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
    "split_train_valid",
    "split_transcript_pair",
]

log = logging.getLogger("rlhf")

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"

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


def read_rows(
    spec,
    parse: Callable[[Any], T],
    *,
    skip_bad_rows: bool,
    stats: dict | None,
    what: str,
    allowed: tuple[str, ...] = (".jsonl",),
    reader: Callable[[Path], Iterator[tuple[int, Any]]] = _iter_rows,
) -> list[T]:
    paths = expand_paths(spec)
    for path in paths:
        _check_suffix(path, allowed)
    out: list[T] = []
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
            out.append(item)
    if stats is not None:
        stats["read"] = len(out)
        stats["skipped"] = skipped
    where = ", ".join(str(p) for p in paths)
    if not out:
        if skipped:
            raise DataError(f"every row ({skipped}) was bad in {where}; first: {first_bad}")
        raise DataError(f"{where}: no {what} rows found (empty files?)")
    if skipped:
        log.warning(
            "skipped %d bad %s row(s) of %d in %s; first: %s",
            skipped, what, skipped + len(out), where, first_bad,
        )
    return out


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


# --------------------------------------------------------------------------------------- SFT


def _parse_sft(row: Any) -> SFTExample:
    row = require_object(row)
    return SFTExample(
        prompt=_get_str(row, "prompt", nonempty=False),
        response=_get_str(row, "response", nonempty=True),
    )


def read_sft_examples(spec, skip_bad_rows: bool = False, stats: dict | None = None) -> list[SFTExample]:
    """Read `{"prompt", "response"}` rows."""
    return read_rows(spec, _parse_sft, skip_bad_rows=skip_bad_rows, stats=stats, what="SFT")


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


def parse_pair(row: Any) -> PreferencePair:
    row = require_object(row)
    if "prompt" in row:
        prompt = _get_str(row, "prompt", nonempty=False)
        chosen = _get_str(row, "chosen", nonempty=True)
        rejected = _get_str(row, "rejected", nonempty=True)
        if chosen == rejected:
            raise BadRow("chosen and rejected are identical")
        return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)
    chosen = _get_str(row, "chosen", nonempty=True)
    rejected = _get_str(row, "rejected", nonempty=True)
    return split_transcript_pair(chosen, rejected)


def read_preference_pairs(
    spec, skip_bad_rows: bool = False, stats: dict | None = None
) -> list[PreferencePair]:
    """Read `{"prompt", "chosen", "rejected"}` rows or hh-rlhf `{"chosen", "rejected"}` transcripts.

    Both formats may be mixed, even within one file; a row with a "prompt" key is explicit.
    """
    return read_rows(spec, parse_pair, skip_bad_rows=skip_bad_rows, stats=stats, what="preference")


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


def read_ratings(spec, skip_bad_rows: bool = False, stats: dict | None = None) -> list[Rating]:
    """Read `{"prompt", "response", "rating"}` rows.

    1-5 stars -> label 0..4 with num_levels 5; "up"/"down" or true/false -> 1/0 with num_levels 2.
    Mixing the two scales in the files read raises `DataError` (even with `skip_bad_rows`).
    """
    first_of_scale: dict[int, str] = {}
    where = {"loc": ""}

    def parse(row: Any) -> Rating:
        row = require_object(row)
        prompt = _get_str(row, "prompt", nonempty=False)
        response = _get_str(row, "response", nonempty=True)
        if "rating" not in row:
            raise BadRow(f"missing key 'rating' (keys: {sorted(row)})")
        label, levels = _parse_rating_value(row["rating"])
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

    return read_rows(
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
