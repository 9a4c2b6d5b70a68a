"""Stage artifacts on disk: written atomically, a stage is complete only once its marker exists.

Stage dir layout (`<run dir>/stages/<NN>_<slot>/`):
  policy.safetensors   the policy's weights after the stage
  model.yaml           the model config, so the weights load on their own (export, best-of-N)
  tokenizer.json       the tokenizer
  config.yaml          the stage's resolved config
  metrics.json         flat keys: the stage's final evaluation
  samples.jsonl        a few evaluation generations
  checkpoints/last.ckpt  the resumable Lightning checkpoint while the stage runs (removed once complete)
  COMPLETE             written last
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from rlhf.errors import RLHFError

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


def save_weights(module: torch.nn.Module, path: str | Path) -> None:
    # contiguous clones: safetensors refuses tensors that share storage (tied embeddings)
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        raise RLHFError(f"{path}: weights not found")
    module.load_state_dict(load_file(str(path)))


def is_complete(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / MARKER).exists()


def mark_complete(stage_dir: str | Path) -> None:
    write_text(Path(stage_dir) / MARKER, "")


def save_model_files(stage_dir: Path, model_cfg, tokenizer) -> None:
    described = OmegaConf.create(OmegaConf.to_container(model_cfg))
    if "compile" in described:  # how a run chose to run, not part of the weights: loaders run eagerly
        described.compile = False
    write_text(stage_dir / "model.yaml", OmegaConf.to_yaml(described))
    with atomic_path(stage_dir / "tokenizer.json") as tmp:
        tokenizer.save(tmp)


def load_policy(stage_dir: str | Path):
    """(model, tokenizer) from a finished stage dir, for generation, export or the feedback page."""
    from rlhf.data.tokenizer import load_tokenizer
    from rlhf.model import ModelConfig, build_model

    stage_dir = Path(stage_dir)
    if not is_complete(stage_dir):
        raise RLHFError(f"{stage_dir}: not a complete stage dir (no {MARKER} marker)")
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(stage_dir / "model.yaml")))
    tokenizer = load_tokenizer(stage_dir / "tokenizer.json")
    if model_cfg.backend == "hf":
        # the architecture from the original checkpoint's config; its weights are not read, the trained ones load next
        from rlhf.hf_backend import load_hf_model

        model = load_hf_model(model_cfg, pretrained_weights=False)
    else:
        model = build_model(model_cfg, tokenizer.vocab_size)
    load_weights(model, stage_dir / "policy.safetensors")
    return model.eval(), tokenizer


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
