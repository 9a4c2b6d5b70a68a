"""Character-level tokenizer for the built-in task, and the interface every tokenizer meets.

A tokenizer has `encode(text) -> list[int]` (no special tokens added), `decode(ids) -> str`
(special tokens dropped), `vocab_size`, `pad_id`, `eos_id` and `save(path)`, whose file
`rlhf.models.checkpoint.load_tokenizer` reads back whatever the kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from rlhf.errors import DataError


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, path: str | Path) -> None: ...


PAD, EOS = "<pad>", "<eos>"


class CharTokenizer:
    """One id per character of a fixed alphabet; ids 0 and 1 are <pad> and <eos>."""

    kind = "char"

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        self.alphabet = alphabet
        self.pad_id, self.eos_id = 0, 1
        self._to_id = {ch: i + 2 for i, ch in enumerate(alphabet)}
        self._to_char = {i + 2: ch for i, ch in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 2

    def encode(self, text: str) -> list[int]:
        try:
            return [self._to_id[ch] for ch in text]
        except KeyError as err:
            raise DataError(f"character {err.args[0]!r} is not in the tokenizer's alphabet") from None

    def decode(self, ids) -> str:
        return "".join(self._to_char.get(int(i), "") for i in ids)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"kind": self.kind, "alphabet": self.alphabet}))
