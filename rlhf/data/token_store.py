"""Encoded rows kept compactly: one flat int32 buffer of token ids and an offset per field.

Stages that train on data files encode every row once, up front, and draw batches from the
ids. As Python lists of ints those ids cost ~36 bytes a token (an 8-byte pointer and, for ids
above 256, a 28-byte int object); here a token costs 4 bytes, plus 8 bytes of offset per field
per row. The rows are read as a stream (rlhf.data.jsonl's `stream_*` readers) and encoded a
chunk at a time, so neither the file's text nor its parsed rows are ever all resident: at 100k
preference pairs a stage's peak memory is ~2x the tokens' int32 bytes above a 10-row file, 1.5x
at 300k, where the reward model's lists of ints took 28x (benchmarks/bench_data_memory.py, README).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Optional, TypeVar

import numpy as np

__all__ = ["TokenStore", "encode_texts", "store_rows"]

T = TypeVar("T")
Row = tuple  # F lists of token ids, then the label if the store has labels

# `array` grows in place as rows arrive (amortised, no Python object per token); its buffer
# becomes the numpy array without a copy. "i" is a C int: 4 bytes on every platform torch runs on.
_INT32, _INT64 = "i", "q"
assert array(_INT32).itemsize == 4 and array(_INT64).itemsize == 8


class TokenStore:
    """N rows of F token-id fields each (e.g. prompt, chosen, rejected), and optionally one int label per row.

    `tokens`: (T,) int32, every field of every row back to back; `offsets`: (R*F + 1,) int64,
    field f of stored row r is `tokens[offsets[r*F + f] : offsets[r*F + f + 1]]`; `labels`:
    (R,) int64 or None. `index`: (N,) int64 stored rows this store shows, in order (a `subset`
    shares the buffers instead of copying them); None: all R of them.

    `store[i]` is row i as the stages' batch code takes it: a tuple of F lists of ints, then the
    label if there are labels. Fields may be empty. Raises IndexError outside [-N, N).
    """

    def __init__(
        self,
        num_fields: int,
        tokens: np.ndarray,
        offsets: np.ndarray,
        labels: Optional[np.ndarray] = None,
        index: Optional[np.ndarray] = None,
    ):
        if num_fields < 1 or (len(offsets) - 1) % num_fields:
            raise ValueError(f"{len(offsets)} offsets do not make rows of {num_fields} fields")
        self.num_fields, self.tokens, self.offsets, self.labels, self.index = num_fields, tokens, offsets, labels, index
        stored = (len(offsets) - 1) // num_fields
        if labels is not None and len(labels) != stored:
            raise ValueError(f"{len(labels)} labels for {stored} rows")
        self._len = stored if index is None else len(index)

    def __len__(self) -> int:
        return self._len

    def _stored(self, i: int) -> int:
        if not -self._len <= i < self._len:
            raise IndexError(f"row {i} of a store of {self._len}")
        i %= self._len
        return i if self.index is None else int(self.index[i])

    def __getitem__(self, i: int) -> Row:
        r = self._stored(i)
        f = self.num_fields
        bounds = self.offsets[r * f : r * f + f + 1].tolist()
        fields = tuple(self.tokens[a:b].tolist() for a, b in zip(bounds, bounds[1:]))
        return fields if self.labels is None else (*fields, int(self.labels[r]))

    def __iter__(self) -> Iterator[Row]:
        return (self[i] for i in range(self._len))

    def subset(self, indices: Sequence[int]) -> TokenStore:
        """The rows `indices` of this store, in that order, sharing its buffers (no copy of the tokens)."""
        picked = np.asarray(indices, dtype=np.int64)
        base = np.arange(self._len, dtype=np.int64) if self.index is None else self.index
        return TokenStore(self.num_fields, self.tokens, self.offsets, self.labels, base[picked] if len(picked) else picked)

    @property
    def nbytes(self) -> int:
        """Bytes held: tokens, offsets, labels and index."""
        return sum(a.nbytes for a in (self.tokens, self.offsets, self.labels, self.index) if a is not None)


def store_rows(
    rows: Iterable[T],
    encode: Callable[[list[T]], Iterable[Sequence[Sequence[int]]]],
    num_fields: int,
    label: Optional[Callable[[T], int]] = None,
    chunk_size: int = 1024,
) -> TokenStore:
    """Encode `rows` (any iterable, consumed once, `chunk_size` at a time) into a `TokenStore`.

    `encode(chunk)` returns each row's `num_fields` token-id lists, in order (one call per chunk,
    so a tokenizer can encode the chunk's texts in one batch); `label(row)`, if given, its label.
    Errors from `rows` or `encode` propagate unchanged. An empty `rows` gives an empty store.
    """
    tokens, offsets = array(_INT32), array(_INT64, [0])
    labels = array(_INT64) if label is not None else None
    chunk: list[T] = []

    def flush() -> None:
        encoded = list(encode(chunk))
        if len(encoded) != len(chunk):
            raise ValueError(f"encode gave {len(encoded)} rows for a chunk of {len(chunk)}")
        for row, fields in zip(chunk, encoded):
            if len(fields) != num_fields:
                raise ValueError(f"encode gave {len(fields)} fields, expected {num_fields}")
            for ids in fields:
                tokens.extend(ids)
                offsets.append(len(tokens))
            if labels is not None:
                labels.append(label(row))
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) == chunk_size:
            flush()
    if chunk:
        flush()
    return TokenStore(
        num_fields,
        np.frombuffer(tokens, dtype=np.int32) if tokens else np.zeros(0, dtype=np.int32),
        np.frombuffer(offsets, dtype=np.int64),
        None if labels is None else np.frombuffer(labels, dtype=np.int64) if labels else np.zeros(0, dtype=np.int64),
    )


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer.encode` of each text: one `encode_batch` call where the tokenizer has one
    (BPE and Hugging Face tokenizers: parallel in Rust, the same ids), else one by one."""
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(t) for t in texts]
