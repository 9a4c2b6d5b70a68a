"""The compact store of encoded rows (rlhf.data.token_store): exact values, offsets, subsets."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf.data.token_store import encode_texts, store_rows
from rlhf.models import CharTokenizer

ROWS = [([], [5, 6, 1], [7, 1]), ([2, 3], [300, 1], [4, 4, 4, 1]), ([9], [8], [])]  # an empty prompt, a big id, an empty field


def test_three_rows_round_trip_with_their_offsets():
    store = store_rows(ROWS, lambda chunk: chunk, 3, chunk_size=2)  # two chunks
    assert len(store) == 3
    assert [store[i] for i in range(3)] == ROWS and list(store) == ROWS
    assert store[-1] == ([9], [8], [])
    assert store.tokens.dtype == np.int32 and store.tokens.tolist() == [5, 6, 1, 7, 1, 2, 3, 300, 1, 4, 4, 4, 1, 9, 8]
    assert store.offsets.tolist() == [0, 0, 3, 5, 7, 9, 13, 14, 15, 15]
    assert store.nbytes == 15 * 4 + 10 * 8
    with pytest.raises(IndexError):
        store[3]


def test_labels_and_a_subset_share_the_buffers():
    store = store_rows(ROWS, lambda chunk: chunk, 3, label=lambda row: len(row[0]))
    assert store[1] == ([2, 3], [300, 1], [4, 4, 4, 1], 2)
    sub = store.subset([2, 0])
    assert list(sub) == [([9], [8], [], 1), ([], [5, 6, 1], [7, 1], 0)]
    assert sub.tokens is store.tokens
    assert list(sub.subset([1])) == [([], [5, 6, 1], [7, 1], 0)]
    assert len(store.subset([])) == 0


def test_empty_input_and_wrong_encodings():
    empty = store_rows([], lambda chunk: chunk, 2)
    assert len(empty) == 0 and list(empty) == []
    with pytest.raises(ValueError, match="fields"):
        store_rows([([1],)], lambda chunk: chunk, 2)
    with pytest.raises(ValueError, match="rows"):
        store_rows([1, 2], lambda chunk: [], 1)


def test_encode_texts_matches_encode():
    tok = CharTokenizer("abc ")
    assert encode_texts(tok, ["ab", "", "c a"]) == [[2, 3], [], [4, 5, 2]]
