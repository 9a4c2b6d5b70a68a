"""Byte-level BPE tokenizer for real text, trained with Hugging Face `tokenizers` and saved with the run.

Byte-level means every string maps to bytes first, so any text (emoji, newlines, control
characters) round-trips exactly: ``decode(encode(s)) == s``. Special tokens are ``<pad>`` (id 0)
and ``<eos>`` (id 1); `encode` never adds them, `decode` drops them, and a literal "<eos>" in the
input text is encoded as ordinary bytes, never as the special id.

The saved file is one JSON object ``{"kind": "bpe", "tokenizer": {...tokenizers JSON...}}`` that
`rlhf.models.tokenizer.load_tokenizer` dispatches on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rlhf.errors import ConfigError, DataError
from rlhf.models.tokenizer import EOS, PAD

__all__ = ["BPETokenizer"]

_SPECIALS = [PAD, EOS]  # ids 0 and 1, in this order


class BPETokenizer:
    """Byte-level BPE with `<pad>` = 0 and `<eos>` = 1 (see the module docstring)."""

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer):
        pad_id, eos_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOS)
        if (pad_id, eos_id) != (0, 1):
            raise DataError(f"BPE tokenizer must have {PAD}=0 and {EOS}=1, got {pad_id} and {eos_id}")
        # Special-token strings inside user text are encoded as plain bytes, not as specials.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.pad_id, self.eos_id = 0, 1
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ building
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> BPETokenizer:
        """Train on an iterable of documents. The vocabulary may come out smaller than
        `vocab_size` on a small corpus; it always holds the 2 specials and all 256 bytes."""
        if vocab_size < len(_SPECIALS) + 256:
            raise ConfigError(f"BPE vocab_size must be at least {len(_SPECIALS) + 256}, got {vocab_size}")
        if min_frequency < 1:
            raise ConfigError(f"BPE min_frequency must be at least 1, got {min_frequency}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((t for t in texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: tokenizer file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: cannot read tokenizer file ({err})") from None
        if not isinstance(spec, dict) or spec.get("kind") != cls.kind or "tokenizer" not in spec:
            raise DataError(f"{path}: not a BPE tokenizer file (expected {{'kind': 'bpe', 'tokenizer': ...}})")
        body = spec["tokenizer"]
        try:
            tok = Tokenizer.from_str(body if isinstance(body, str) else json.dumps(body))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError(f"{path}: invalid tokenizer definition ({err})") from None
        try:
            return cls(tok)
        except DataError as err:
            raise DataError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        payload = {"kind": self.kind, "tokenizer": json.loads(self._tok.to_str())}
        path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")

    # ------------------------------------------------------------------ use
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"
