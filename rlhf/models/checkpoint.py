"""A policy's files in a stage dir (layout: rlhf/files.py): its weights, `model.yaml` and
`tokenizer.json`, written atomically, and `load_policy`, which reads the three back
(`load_tokenizer` reads any kind of tokenizer file)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from rlhf.errors import DataError, RLHFError
from rlhf.files import MARKER, atomic_path, is_complete, write_text
from rlhf.models.bpe import BPETokenizer
from rlhf.models.build import build_model
from rlhf.models.config import ModelConfig
from rlhf.models.hf import HFTokenizer, load_hf_model
from rlhf.models.tokenizer import CharTokenizer


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


def save_model_files(stage_dir: Path, model_cfg, tokenizer) -> None:
    described = OmegaConf.create(OmegaConf.to_container(model_cfg))
    if "compile" in described:  # how a run chose to run, not part of the weights: loaders run eagerly
        described.compile = False
    write_text(stage_dir / "model.yaml", OmegaConf.to_yaml(described))
    with atomic_path(stage_dir / "tokenizer.json") as tmp:
        tokenizer.save(tmp)


def load_tokenizer(path: str | Path):
    """Load any tokenizer written by a tokenizer's `save`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: tokenizer file not found")
    spec = json.loads(path.read_text())
    if spec.get("kind") == "char":
        return CharTokenizer(spec["alphabet"])
    if spec.get("kind") == "bpe":
        return BPETokenizer.load(path)
    if spec.get("kind") == "hf":  # a Hugging Face checkpoint's tokenizer
        return HFTokenizer.load(path)
    raise DataError(f"{path}: unknown tokenizer kind {spec.get('kind')!r}")


def load_policy(stage_dir: str | Path):
    """(model, tokenizer) from a finished stage dir, for generation, export or the feedback page."""
    stage_dir = Path(stage_dir)
    if not is_complete(stage_dir):
        raise RLHFError(f"{stage_dir}: not a complete stage dir (no {MARKER} marker)")
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(stage_dir / "model.yaml")))
    tokenizer = load_tokenizer(stage_dir / "tokenizer.json")
    if model_cfg.backend == "hf":
        # the architecture from the original checkpoint's config; its weights are not read, the trained ones load next
        model = load_hf_model(model_cfg, pretrained_weights=False)
    else:
        model = build_model(model_cfg, tokenizer.vocab_size)
    load_weights(model, stage_dir / "policy.safetensors")
    return model.eval(), tokenizer
