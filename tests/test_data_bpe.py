"""Byte-level BPE tokenizer (rlhf.models.bpe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.errors import ConfigError, DataError
from rlhf.models import BPETokenizer, load_tokenizer

HH_DIR = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf"

CORPUS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, then bake it.",
    "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road? To get to the other side!",
    "The quick brown fox jumps over the lazy dog. Ünïcödé text, 中文, emoji 🎉🎉 and tabs\tand newlines\n.",
] * 20

TRICKY = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "\n\nHuman: hi\n\nAssistant: hello\r\n\ttabbed\n",
    "emoji 👋🏽 family 👨‍👩‍👧 flags 🇫🇷 and math 𝔘𝔫𝔦",
    "CJK 中文字符 日本語 한국어, accents e\u0301 ü, RTL עברית العربية",
    "control \x00\x01\x7f and zero-width \u200b joiner \u200d",
    "never seen: ꙮ𓀀🜁",
    "literal specials <pad> and <eos> in text",
]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400, min_frequency=2)


def test_specials_and_vocab(tok):
    assert tok.kind == "bpe"
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    assert 258 < tok.vocab_size <= 400  # 2 specials + 256 bytes + merges
    ids = tok.encode("The capital of France is Paris.")
    assert all(2 <= i < tok.vocab_size for i in ids)  # no specials added
    assert len(ids) < len("The capital of France is Paris.")  # merges learned


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_literal_special_strings_are_plain_text(tok):
    ids = tok.encode("<eos>")
    assert tok.eos_id not in ids and tok.pad_id not in ids


def test_decode_drops_specials_and_accepts_tensors(tok):
    torch = pytest.importorskip("torch")
    ids = tok.encode("Paris")
    assert tok.decode([tok.pad_id, *ids, tok.eos_id, tok.pad_id]) == "Paris"
    assert tok.decode(torch.tensor(ids)) == "Paris"


def test_save_load_through_load_tokenizer(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    spec = json.loads(path.read_text(encoding="utf-8"))
    assert spec["kind"] == "bpe" and "tokenizer" in spec
    loaded = load_tokenizer(path)
    assert isinstance(loaded, BPETokenizer)
    assert (loaded.vocab_size, loaded.pad_id, loaded.eos_id) == (tok.vocab_size, 0, 1)
    for text in TRICKY + CORPUS[:4]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert loaded.encode_batch(CORPUS[:4]) == [tok.encode(t) for t in CORPUS[:4]]


def test_load_accepts_tokenizer_as_json_string(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["tokenizer"] = json.dumps(spec["tokenizer"])
    path.write_text(json.dumps(spec), encoding="utf-8")
    assert BPETokenizer.load(path).encode("Hello") == tok.encode("Hello")


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        BPETokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "bpe", "tokenizer": {"model": "nonsense"}}))
    with pytest.raises(DataError, match="bad.json: invalid tokenizer definition"):
        BPETokenizer.load(bad)
    bad.write_text(json.dumps({"kind": "char", "alphabet": "ab"}))
    with pytest.raises(DataError, match="bad.json: not a BPE tokenizer file"):
        BPETokenizer.load(bad)


def test_train_rejects_tiny_vocab():
    with pytest.raises(ConfigError, match="vocab_size"):
        BPETokenizer.train(CORPUS, vocab_size=100)


def test_train_on_real_hh_rlhf_transcripts():
    path = HH_DIR / "helpful-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"hh-rlhf data not found at {path} (expected ../shared/data beside the checkout)")
    from rlhf.data.jsonl import read_preference_pairs

    pairs = read_preference_pairs(path, skip_bad_rows=True)[:2000]
    texts = [p.prompt + p.chosen for p in pairs]
    tok = BPETokenizer.train(texts, vocab_size=2048)
    assert tok.vocab_size == 2048
    for text in texts[:200]:
        assert tok.decode(tok.encode(text)) == text
    # real English compresses well below one token per character
    n_chars = sum(len(t) for t in texts[:200])
    n_ids = sum(len(ids) for ids in tok.encode_batch(texts[:200]))
    assert n_ids < 0.4 * n_chars
