"""`python -m rlhf export STAGE_DIR --out DIR [--what policy|reward_model]`: a trained model in a
portable folder.

Hugging Face backend: a `save_pretrained` folder (model + tokenizer, chat template included)
that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer` load
directly, and that `model=hf model.path=DIR` trains further.

x-transformers backend: `model.safetensors` (the policy's state dict), `config.json`
(`{"format": "rlhf", "model": <ModelConfig>, "vocab_size": V}`) and `tokenizer.json`;
`load_exported(DIR)` rebuilds the model from them.

`--what reward_model` exports a `reward_model` stage's trunk the same way plus its head:
`reward_head.safetensors` (a linear layer read at the last response token, the EOS) and
`reward_head.json` (`num_bins`). `load_exported` then returns an `rlhf.reward.RewardModel`.

The folder is written under a temporary name beside DIR and renamed at the end: DIR either
holds a complete export or does not exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from rlhf.errors import ConfigError, RLHFError
from rlhf.files import MARKER, is_complete
from rlhf.models import HFCausalLM, ModelConfig, build_model, load_hf_model, load_hf_tokenizer, load_policy, load_tokenizer, load_weights

FORMAT = "rlhf"
HEAD_WEIGHTS, HEAD_CONFIG = "reward_head.safetensors", "reward_head.json"


def _model_config(stage_dir: Path):
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(stage_dir / "model.yaml")))


def _write_trunk(model: nn.Module, tokenizer, model_cfg, folder: Path) -> None:
    """The LM itself: save_pretrained for the HF backend, safetensors + config + tokenizer otherwise."""
    if isinstance(model, HFCausalLM):
        model.model.save_pretrained(str(folder))
        hf_tokenizer = tokenizer.to_transformers()
        hf_tokenizer.model_max_length = model.max_seq_len
        hf_tokenizer.save_pretrained(str(folder))
        return
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = {"format": FORMAT, "model": dataclasses.asdict(model_cfg), "vocab_size": tokenizer.vocab_size}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(folder / "tokenizer.json")


def export_stage(stage_dir: str | Path, out: str | Path, what: str = "policy") -> Path:
    """Export a complete stage's policy (or reward model) to the new folder `out`; returns it."""
    stage_dir, out = Path(stage_dir), Path(out)
    if what not in ("policy", "reward_model"):
        raise ConfigError(f"--what {what!r} is not one of: policy, reward_model")
    if not is_complete(stage_dir):
        raise RLHFError(f"{stage_dir}: not a complete stage dir (no {MARKER} marker)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: already exists; choose a new folder or remove it")
    model_cfg = _model_config(stage_dir)
    if what == "policy":
        model, tokenizer = load_policy(stage_dir)
        trunk, head = model, None
    else:
        from rlhf.reward import load_reward_model

        reward_model, tokenizer = load_reward_model(stage_dir)
        trunk, head = reward_model.trunk, reward_model

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the export private to this user
    try:
        _write_trunk(trunk, tokenizer, model_cfg, tmp)
        if head is not None:
            state = {k: v.detach().contiguous().clone() for k, v in head.head.state_dict().items()}
            save_file(state, str(tmp / HEAD_WEIGHTS))
            spec = {"num_bins": head.num_bins, "pooling": "hidden state at the last response token (the EOS)"}
            (tmp / HEAD_CONFIG).write_text(json.dumps(spec, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # an empty folder the user made: the rename replaces it
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_exported(folder: str | Path):
    """(model, tokenizer) from an exported folder: an `rlhf.reward.RewardModel` if it holds a
    reward head, else the policy (`rlhf.models.CausalLM` or `rlhf.models.HFCausalLM`)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder}: not an exported model folder (no config.json)")
    config = json.loads(config_path.read_text())
    if config.get("format") == FORMAT:
        tokenizer = load_tokenizer(folder / "tokenizer.json")
        model_cfg = ModelConfig(**config["model"])
        model = build_model(model_cfg, int(config["vocab_size"]))
        load_weights(model, folder / "model.safetensors")
    else:  # a save_pretrained folder
        model_cfg = ModelConfig(backend="hf", path=str(folder))
        model, tokenizer = load_hf_model(model_cfg), load_hf_tokenizer(model_cfg)
    if (folder / HEAD_CONFIG).is_file():
        from rlhf.reward import RewardModel

        spec = json.loads((folder / HEAD_CONFIG).read_text())
        reward_model = RewardModel(model, num_bins=int(spec["num_bins"]))
        load_weights(reward_model.head, folder / HEAD_WEIGHTS)
        return reward_model.eval(), tokenizer
    return model.eval(), tokenizer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf export", description="Export a trained stage's model to a portable folder.")
    parser.add_argument("stage_dir", help="a complete stage dir: <run dir>/stages/NN_slot")
    parser.add_argument("--out", required=True, help="the folder to create (must not exist or be empty)")
    parser.add_argument("--what", default="policy", choices=["policy", "reward_model"], help="policy (default) or a reward_model stage's reward model")
    args = parser.parse_args(argv)
    out = export_stage(args.stage_dir, args.out, args.what)
    print(f"exported {args.what} of {args.stage_dir} to {out}")
    return 0
