"""Files a run writes: atomically, and a stage is complete only once its marker exists.

Stage dir layout (`<run dir>/stages/<NN>_<slot>/`):
  policy.safetensors   the policy's weights after the stage (rlhf.models.checkpoint)
  model.yaml           the model config, so the weights load on their own (export, best-of-N)
  tokenizer.json       the tokenizer
  config.yaml          the stage's resolved config
  metrics.json         flat keys: the stage's final evaluation
  samples.jsonl        a few evaluation generations
  checkpoints/last.ckpt  the resumable Lightning checkpoint while the stage runs (removed once complete)
  COMPLETE             written last

Standard library only: tasks, data and the feedback tools use it without importing torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

MARKER = "COMPLETE"


def new_file_mode() -> int:
    """The mode open() gives a new file under the process umask (0o666 less it); mkstemp's
    temporary files are 0600, which would make every renamed file private to this user."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.
    The file ends with the mode the umask gives new files, as if written in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, new_file_mode())  # after the block: writers such as safetensors recreate the file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def is_complete(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / MARKER).exists()


def mark_complete(stage_dir: str | Path) -> None:
    write_text(Path(stage_dir) / MARKER, "")
