"""The rollout buffer: memory and memmap store the same rows; whitening statistics over chunks."""

import numpy as np
import pytest
import torch

from rlhf.losses.policy_gradient import masked_whiten
from rlhf.rollout import MaskedMoments, make_buffer, trim
from rlhf.rollout_buffer import RolloutBuffer

FIELDS = {"tokens": ((6,), np.int64), "mask": ((6,), np.bool_), "logprobs": ((5,), np.float32), "reward": ((), np.float32)}


def fill(buffer: RolloutBuffer, rows: int, chunk: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = {
        "tokens": torch.randint(0, 50, (rows, 6), generator=g),
        "mask": torch.rand(rows, 6, generator=g) > 0.5,
        "logprobs": -torch.rand(rows, 5, generator=g),
        "reward": torch.randn(rows, generator=g),
    }
    for start in range(0, rows, chunk):
        buffer.write(start, **{k: v[start : start + chunk] for k, v in data.items()})
    return data


@pytest.mark.parametrize("kind", ["memory", "memmap"])
def test_round_trip_by_minibatch_indices(kind, tmp_path):
    buffer = RolloutBuffer(10, FIELDS, kind=kind, directory=tmp_path / "buf")
    data = fill(buffer, 10, chunk=3)
    buffer.flush()
    idx = torch.tensor([7, 2, 9, 0])  # unsorted on purpose: rows come back in the asked order
    out = buffer.read(idx)
    for name, value in data.items():
        assert out[name].dtype == value.dtype
        assert torch.equal(out[name], value[idx]), name
    if kind == "memmap":
        assert sorted(p.name for p in (tmp_path / "buf").iterdir()) == ["logprobs.npy", "mask.npy", "reward.npy", "tokens.npy"]
        # the files are plain .npy: readable without the buffer
        assert np.array_equal(np.load(tmp_path / "buf" / "tokens.npy"), data["tokens"].numpy())
    buffer.close()
    assert not (tmp_path / "buf").exists()


def test_memmap_and_memory_agree_and_narrow_rows_are_zero_padded(tmp_path):
    a = RolloutBuffer(4, FIELDS, kind="memory")
    b = RolloutBuffer(4, FIELDS, kind="memmap", directory=tmp_path / "b")
    for buf in (a, b):
        buf.write(0, tokens=torch.full((4, 6), 3))
        buf.write(1, tokens=torch.tensor([[5, 6, 7], [8, 9, 10]]))  # narrower rows: rest is zero
    expected = torch.tensor([[3] * 6, [5, 6, 7, 0, 0, 0], [8, 9, 10, 0, 0, 0], [3] * 6])
    assert torch.equal(a.column("tokens"), expected)
    assert torch.equal(b.column("tokens"), expected)
    with pytest.raises(IndexError):
        a.write(3, tokens=torch.zeros(2, 6, dtype=torch.long))


def test_a_new_memmap_buffer_replaces_the_previous_rollout(tmp_path):
    first = RolloutBuffer(3, FIELDS, kind="memmap", directory=tmp_path / "r")
    first.write(0, reward=torch.ones(3))
    first.flush()
    second = RolloutBuffer(2, FIELDS, kind="memmap", directory=tmp_path / "r")
    assert torch.equal(second.column("reward"), torch.zeros(2))


def test_stage_buffer_layout(tmp_path):
    buf = make_buffer("memmap", tmp_path, rank=1, rows=3, width=7, fields={"tokens": "tokens", "response_mask": "mask", "old_logprobs": "shifted", "advantages": "row"})
    assert buf.directory == tmp_path / "rollout_buffer" / "rank1"
    shapes = {k: v.shape for k, v in buf.arrays.items()}
    assert shapes == {"tokens": (3, 7), "response_mask": (3, 7), "old_logprobs": (3, 6), "advantages": (3,)}


def test_trim_cuts_unused_columns():
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    out = trim({"tokens": torch.ones(2, 5), "response_mask": mask, "lp": torch.ones(2, 4), "adv": torch.ones(2)})
    assert out["tokens"].shape == (2, 4) and out["response_mask"].shape == (2, 4)
    assert out["lp"].shape == (2, 3) and out["adv"].shape == (2,)


def test_chunked_whitening_equals_masked_whiten():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 7, generator=g) * 3 + 1
    mask = (torch.rand(9, 7, generator=g) > 0.3).float()
    moments = MaskedMoments()
    for start in range(0, 9, 4):  # statistics gathered chunk by chunk, as the stages write a rollout
        moments.add(x[start : start + 4], mask[start : start + 4])
    torch.testing.assert_close(moments.whiten(x, mask), masked_whiten(x, mask), rtol=1e-5, atol=1e-5)


def test_chunked_whitening_of_equal_entries_is_exactly_zero():
    # E[x^2] - mean^2 of equal float32 entries is rounding, not 0: whitening it gave ~1e-4 per entry
    x, mask = torch.full((6, 5), 0.7), torch.ones(6, 5)
    moments = MaskedMoments()
    moments.add(x[:3], mask[:3])
    moments.add(x[3:], mask[3:])
    assert moments.constant and torch.equal(moments.whiten(x, mask), torch.zeros_like(x))
