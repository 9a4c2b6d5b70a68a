"""Readers for local JSONL data files (rlhf.data.jsonl)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from rlhf.data.examples import PreferencePair, Rating, SFTExample
from rlhf.data.jsonl import (
    BadRow,
    expand_paths,
    read_preference_pairs,
    read_ratings,
    read_raw_text,
    read_sft_examples,
    split_train_valid,
    split_transcript_pair,
)
from rlhf.errors import ConfigError, DataError

HH_DIR = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf"


def write_jsonl(path: Path, rows, *, gz: bool = False) -> Path:
    """Write rows (dicts are JSON-encoded, strings are written verbatim) one per line."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------- expand_paths


def test_expand_paths_glob_list_sorted_dedup(tmp_path):
    for name in ["b.jsonl", "a.jsonl", "c.jsonl.gz", "notes.md"]:
        (tmp_path / name).write_text("")
    assert expand_paths(tmp_path / "a.jsonl") == [tmp_path / "a.jsonl"]
    assert expand_paths(str(tmp_path / "*.jsonl")) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    got = expand_paths([str(tmp_path / "b.jsonl"), str(tmp_path / "*.jsonl*"), tmp_path / "a.jsonl"])
    assert got == [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl.gz"]
    # any non-str iterable works (OmegaConf ListConfig is one)
    assert expand_paths((p for p in [tmp_path / "a.jsonl"])) == [tmp_path / "a.jsonl"]


def test_expand_paths_errors_name_the_spec(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: data file not found"):
        expand_paths(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"nope/\*\.jsonl: no data file matches"):
        expand_paths(str(tmp_path / "nope/*.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        expand_paths(tmp_path)
    with pytest.raises(DataError, match="empty list"):
        expand_paths([])
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(DataError, match="missing.jsonl"):
        expand_paths([tmp_path / "a.jsonl", tmp_path / "missing.jsonl"])


def test_reader_on_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_sft_examples(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("prompt,response\n")
    with pytest.raises(DataError, match=r"data.csv: unsupported file type"):
        read_sft_examples(tmp_path / "data.csv")


# ----------------------------------------------------------------------------------------- SFT


def test_sft_good_rows_gz_blank_lines_and_extra_keys(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Hi", "response": " there", "id": 7}, "", "   "])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"prompt": "", "response": "ünï 👋\nx"}], gz=True)
    got = read_sft_examples(str(tmp_path / "*"))
    assert got == [SFTExample("Hi", " there"), SFTExample("", "ünï 👋\nx")]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "response": "r"}).encode() + b"\n")
    assert read_sft_examples(path) == [SFTExample("p", "r")]


@pytest.mark.parametrize(
    "row, what",
    [
        ("{not json", "invalid JSON"),
        ('["a", "b"]', "row is a JSON array, expected an object"),
        ('"just a string"', "row is a JSON string"),
        ({"response": "r"}, "missing key 'prompt'"),
        ({"prompt": "p"}, "missing key 'response'"),
        ({"prompt": 3, "response": "r"}, "'prompt' must be a string, got a JSON number"),
        ({"prompt": "p", "response": None}, "'response' must be a string, got a JSON null"),
        ({"prompt": "p", "response": ""}, "'response' is empty"),
        ({"prompt": "p", "response": "  \n"}, "'response' is empty"),
    ],
)
def test_sft_bad_rows_name_file_and_line(tmp_path, row, what):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}, "", row])
    with pytest.raises(DataError) as err:
        read_sft_examples(path)
    assert f"{path}:3: " in str(err.value)
    assert what in str(err.value)


def test_invalid_utf8_is_a_bad_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_sft_examples(path)


def test_skip_bad_rows_counts_and_warns_once(tmp_path, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}, "{oops", {"prompt": "p"}])
    write_jsonl(tmp_path / "b.jsonl", [[1], {"prompt": "q", "response": "s"}])
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        got = read_sft_examples([a, tmp_path / "b.jsonl"], skip_bad_rows=True, stats=stats)
    assert got == [SFTExample("p", "r"), SFTExample("q", "s")]
    assert stats == {"read": 2, "skipped": 3}
    warnings = [r for r in caplog.records if r.name == "rlhf" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 3" in warnings[0].getMessage() and f"{a}:2" in warnings[0].getMessage()


def test_no_warning_and_zero_skipped_when_clean(tmp_path, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}])
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        read_sft_examples(path, skip_bad_rows=True, stats=stats)
    assert stats == {"read": 1, "skipped": 0}
    assert not [r for r in caplog.records if r.name == "rlhf"]


def test_all_rows_bad_or_empty_file_raises(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["{x", {"prompt": 1, "response": "r"}])
    with pytest.raises(DataError, match=r"every row \(2\) was bad.*a.jsonl:1"):
        read_sft_examples(path, skip_bad_rows=True)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no SFT rows"):
        read_sft_examples(tmp_path / "empty.jsonl")


def test_corrupt_gzip_names_the_file(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="x.jsonl.gz: not a readable gzip file"):
        read_sft_examples(path)


# --------------------------------------------------------------------------------- preferences

TRANSCRIPT_PREFIX = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant:"


def test_explicit_preference_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl.gz",
        [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}, {"prompt": "", "chosen": "a", "rejected": "b"}],
        gz=True,
    )
    assert read_preference_pairs(path) == [PreferencePair("Q?", " yes", " no"), PreferencePair("", "a", "b")]


def test_hh_transcript_split_keeps_leading_space():
    chosen = TRANSCRIPT_PREFIX + " An apple."
    rejected = TRANSCRIPT_PREFIX + " A carrot, I think."
    pair = split_transcript_pair(chosen, rejected)
    assert pair.prompt == TRANSCRIPT_PREFIX
    assert pair.prompt.endswith("\n\nAssistant:")
    assert pair.chosen == " An apple." and pair.rejected == " A carrot, I think."
    assert pair.prompt + pair.chosen == chosen and pair.prompt + pair.rejected == rejected


def test_hh_transcript_rows_and_mixed_formats(tmp_path):
    path = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {"chosen": TRANSCRIPT_PREFIX + " An apple.", "rejected": TRANSCRIPT_PREFIX + " A rock."},
            {"prompt": "P", "chosen": "c", "rejected": "r"},
        ],
    )
    got = read_preference_pairs(path)
    assert got == [PreferencePair(TRANSCRIPT_PREFIX, " An apple.", " A rock."), PreferencePair("P", "c", "r")]


def test_hh_responses_sharing_their_first_words_split_at_assistant():
    pair = split_transcript_pair(TRANSCRIPT_PREFIX + " An apple.", TRANSCRIPT_PREFIX + " An orange.")
    assert pair == PreferencePair(TRANSCRIPT_PREFIX, " An apple.", " An orange.")


def test_hh_transcripts_diverging_before_the_last_turn_are_not_a_pair():
    # the two sides diverge inside an earlier assistant turn, then go on with more turns: the
    # "responses" would be whole exchanges, not two answers to one conversation
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Fruit?\n\nAssistant: Apple."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: Fruit?\n\nAssistant: Rock."
    with pytest.raises(BadRow, match="differ before their last"):
        split_transcript_pair(chosen, rejected)


@pytest.mark.parametrize(
    "row, what",
    [
        ({"chosen": TRANSCRIPT_PREFIX + " x", "rejected": TRANSCRIPT_PREFIX + " x"}, "chosen and rejected are identical"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
        ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: ho\n\nAssistant: x"}, "chosen transcript has no"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "share no prefix"),
        ({"chosen": TRANSCRIPT_PREFIX + " ", "rejected": TRANSCRIPT_PREFIX + " y"}, "chosen response after"),
        # the sides differ inside a Human turn: two questions, not two answers to one
        (
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hi.\n\nHuman: Is the sea salty?\n\nAssistant: Yes.",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Hi.\n\nHuman: Is the sea sweet?\n\nAssistant: Yes.",
            },
            "differ before their last",
        ),
        ({"chosen": TRANSCRIPT_PREFIX + " x"}, "missing key 'rejected'"),
        ({"prompt": "p", "chosen": "c", "rejected": 5}, "'rejected' must be a string"),
        ({"prompt": None, "chosen": "c", "rejected": "r"}, "'prompt' must be a string"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "'chosen' is empty"),
    ],
)
def test_preference_bad_rows(tmp_path, row, what):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "P", "chosen": "c", "rejected": "r"}, row])
    with pytest.raises(DataError) as err:
        read_preference_pairs(path)
    assert f"{path}:2: " in str(err.value) and what in str(err.value)
    stats: dict = {}
    assert read_preference_pairs(path, skip_bad_rows=True, stats=stats) == [PreferencePair("P", "c", "r")]
    assert stats["skipped"] == 1


def test_real_hh_rlhf_harmless_test_split():
    path = HH_DIR / "harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"hh-rlhf data not found at {path} (expected ../shared/data beside the checkout)")
    stats: dict = {}
    pairs = read_preference_pairs(path, skip_bad_rows=True, stats=stats)
    total = stats["read"] + stats["skipped"]
    assert total > 2000
    assert stats["read"] / total > 0.95
    assert all(p.prompt.endswith("Assistant:") for p in pairs)
    assert all(p.prompt.startswith("\n\nHuman:") for p in pairs)
    assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in pairs)


# ------------------------------------------------------------------------------------- ratings


def test_ratings_stars_and_thumbs(tmp_path):
    stars = write_jsonl(
        tmp_path / "stars.jsonl",
        [{"prompt": "p", "response": "r", "rating": k} for k in (1, 3, 5)],
    )
    assert [(r.label, r.num_levels) for r in read_ratings(stars)] == [(0, 5), (2, 5), (4, 5)]
    thumbs = write_jsonl(
        tmp_path / "thumbs.jsonl",
        [{"prompt": "p", "response": "r", "rating": v} for v in ("up", "down", True, False, "Up")],
    )
    got = read_ratings(thumbs)
    assert got[0] == Rating("p", "r", 1, 2)
    assert [(r.label, r.num_levels) for r in got] == [(1, 2), (0, 2), (1, 2), (0, 2), (1, 2)]


@pytest.mark.parametrize(
    "rating, what",
    [
        (0, "out of range"),
        (6, "out of range"),
        (3.5, "got 3.5"),
        ("4", "got '4'"),
        ("meh", "got 'meh'"),
        (None, "got None"),
    ],
)
def test_ratings_bad_values(tmp_path, rating, what):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [{"prompt": "p", "response": "r", "rating": 2}, {"prompt": "p", "response": "r", "rating": rating}],
    )
    with pytest.raises(DataError) as err:
        read_ratings(path)
    assert f"{path}:2: " in str(err.value) and what in str(err.value)
    stats: dict = {}
    assert len(read_ratings(path, skip_bad_rows=True, stats=stats)) == 1 and stats["skipped"] == 1


def test_ratings_missing_key(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(DataError, match=r"r.jsonl:1: missing key 'rating'"):
        read_ratings(path)


def test_ratings_mixing_scales_across_files_raises(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r", "rating": 4}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "response": "r", "rating": "up"}])
    with pytest.raises(DataError, match=r"b.jsonl:1: ratings mix two scales.*a.jsonl:1"):
        read_ratings(str(tmp_path / "*.jsonl"), skip_bad_rows=True)


# ------------------------------------------------------------------------------------ raw text


def test_raw_text_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("Line one\nLine two 👋\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": "doc one"}, {"text": "doc two"}], gz=True)
    assert read_raw_text([tmp_path / "a.txt", tmp_path / "b.jsonl.gz"]) == [
        "Line one\nLine two 👋\n",
        "doc one",
        "doc two",
    ]


def test_raw_text_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"txt": "typo"}])
    with pytest.raises(DataError, match=r"t.jsonl:2: missing key 'text'"):
        read_raw_text(path)


# --------------------------------------------------------------------------------------- split


def test_split_train_valid_is_deterministic_and_partitions():
    items = list(range(100))
    train, valid = split_train_valid(items, 0.1, seed=0)
    assert len(valid) == 10 and len(train) == 90
    assert sorted(train + valid) == items
    assert split_train_valid(items, 0.1, seed=0) == (train, valid)
    assert split_train_valid(items, 0.1, seed=1) != (train, valid)
    assert items == list(range(100))  # input untouched


def test_split_train_valid_edges():
    assert split_train_valid([1, 2, 3], 0.0, seed=0)[1] == []
    train, valid = split_train_valid([1, 2, 3], 0.01, seed=0)
    assert len(valid) == 1 and len(train) == 2  # a positive fraction keeps at least one
    train, valid = split_train_valid([1, 2], 0.9, seed=0)
    assert len(train) == 1 and len(valid) == 1  # training keeps at least one
    with pytest.raises(ConfigError, match="valid_fraction"):
        split_train_valid([1, 2], 1.0, seed=0)
