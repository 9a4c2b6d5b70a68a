"""Rollout storage for the RL stages: fixed-shape arrays, written once per rollout, read back by minibatch.

PaLM-rlhf users asked for "memmapped PPO memory": a rollout of many prompts with long
responses does not fit in RAM next to the model. Here a rollout is a set of named
arrays with one row per sampled response (tokens, masks, log-probs, values,
advantages...), all rows of an array the same shape. `kind="memory"` keeps them as
numpy arrays in RAM; `kind="memmap"` keeps them as `.npy` files in a directory
(numpy's open_memmap), so only the minibatch being trained on is in memory and the
OS pages the rest. Both behave the same: `write(start, **rows)` fills rows
[start, start + n), `read(indices)` returns those rows as torch tensors.

The stages create a fresh buffer for every rollout (rows = this rank's rollouts, width =
the longest prompt + max_new_tokens), so nothing is carried between rollouts and a
checkpoint never needs the buffer.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

BUFFER_KINDS = ("memory", "memmap")


class RolloutBuffer:
    """Named fixed-shape arrays of `rows` rows each, in RAM or memory-mapped from `directory`.

    fields: name -> (shape of one row, numpy dtype), e.g. {"tokens": ((64,), np.int64)}.
    """

    def __init__(
        self,
        rows: int,
        fields: dict[str, tuple[tuple[int, ...], type]],
        kind: str = "memory",
        directory: Optional[str | Path] = None,
    ):
        if kind not in BUFFER_KINDS:
            raise ValueError(f"buffer kind {kind!r} is not one of: {', '.join(BUFFER_KINDS)}")
        if kind == "memmap" and directory is None:
            raise ValueError("a memmap buffer needs a directory")
        self.rows, self.kind = rows, kind
        self.directory = Path(directory) if directory is not None else None
        self.arrays: dict[str, np.ndarray] = {}
        if kind == "memmap":
            # a fresh buffer replaces whatever an earlier rollout (or a crashed run) left
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True)
        for name, (shape, dtype) in fields.items():
            full = (rows, *shape)
            if kind == "memory":
                self.arrays[name] = np.zeros(full, dtype=dtype)
            else:
                self.arrays[name] = np.lib.format.open_memmap(self.directory / f"{name}.npy", mode="w+", dtype=dtype, shape=full)

    def write(self, start: int, **values: torch.Tensor | np.ndarray) -> None:
        """Fill rows [start, start + n) of the named arrays (narrower rows are zero-padded on the right)."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            target = self.arrays[name]
            n = value.shape[0]
            if start + n > self.rows:
                raise IndexError(f"rows {start}..{start + n} do not fit a buffer of {self.rows} rows")
            region = target[start : start + n]
            if value.shape[1:] != target.shape[1:]:
                region[...] = 0
                region[(slice(None), *(slice(0, s) for s in value.shape[1:]))] = value
            else:
                region[...] = value

    def read(self, indices: Sequence[int] | torch.Tensor, names: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """The given rows of each named array (all arrays if names is None) as torch tensors (copies)."""
        idx = np.asarray(indices.tolist() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        order = np.argsort(idx)  # sorted reads are sequential on disk; put rows back in the asked order
        out = {}
        for name in names or self.arrays:
            rows = self.arrays[name][idx[order]]
            out[name] = torch.from_numpy(np.ascontiguousarray(rows[np.argsort(order)]))
        return out

    def column(self, name: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Rows [start, stop) of one array as a tensor (a copy)."""
        return torch.from_numpy(np.array(self.arrays[name][start:stop]))

    def flush(self) -> None:
        for array in self.arrays.values():
            if isinstance(array, np.memmap):
                array.flush()

    def close(self) -> None:
        """Drop the arrays (and, for memmap, the files)."""
        self.arrays.clear()
        if self.kind == "memmap" and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
