"""Where rewards come from: a reward model trained in an earlier slot, or a Python function.

A reward function maps (prompts, responses) -> list of floats. Stages that need rewards
take `reward_fn` (a dotted path such as `rlhf.tasks.builtin.verifier_reward`) or
`reward_slot` (the slot of an earlier `reward_model` stage) and call `reward_function`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from rlhf.errors import ConfigError
from rlhf.losses.preference import expected_rating
from rlhf.sampling import truncate_to_fit

RewardFn = Callable[[list[str], list[str]], list[float]]


class RewardModel(nn.Module):
    """A linear head on the LM trunk, read at the last response token (the EOS).

    num_bins == 1: a scalar reward (Bradley-Terry); num_bins > 1: rating logits whose
    expected value is the reward (PaLM-rlhf's binned output). `max_len`: the row length it was
    trained on; `model_reward_fn` cuts longer rows the same way (`truncate`).
    """

    def __init__(self, trunk: nn.Module, num_bins: int = 1, max_len: Optional[int] = None):
        super().__init__()
        self.trunk = trunk
        self.num_bins = num_bins
        self.max_len = max_len
        self.head = nn.Linear(trunk.hidden_size, num_bins)

    def logits(self, tokens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """(B, num_bins) head outputs at each row's last response token."""
        hidden = self.trunk.hidden(tokens)  # no LM head: with a BPE vocabulary it is a large share of the FLOPs
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        last = torch.where(response_mask.bool(), positions, -1).max(dim=1).values.clamp(min=0)
        pooled = hidden[torch.arange(tokens.shape[0], device=tokens.device), last]
        return self.head(pooled)

    def forward(self, tokens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """(B,) rewards."""
        out = self.logits(tokens, response_mask)
        return out.squeeze(-1) if self.num_bins == 1 else expected_rating(out)


def truncate(prompt: list[int], response: list[int], max_len: Optional[int]) -> tuple[list[int], list[int]]:
    """Fit prompt + response + EOS in max_len tokens by rlhf.sampling.truncate_to_fit, the rule
    every stage shares, with one token kept for the EOS the reward is read at."""
    if max_len is None:
        return prompt, response
    prompt, (response,), _ = truncate_to_fit(prompt, [response], max_len - 1)
    return prompt, response


def load_reward_model(stage_dir: str | Path) -> tuple[RewardModel, object]:
    """(reward model, tokenizer) from a complete `reward_model` stage dir."""
    from rlhf.models import ModelConfig, build_model, load_tokenizer, load_weights

    stage_dir = Path(stage_dir)
    if not (stage_dir / "reward_model.safetensors").exists():
        raise ConfigError(f"{stage_dir}: no reward_model.safetensors (is this a reward_model stage?)")
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(stage_dir / "model.yaml")))
    head = OmegaConf.load(stage_dir / "reward_model.yaml")
    tokenizer = load_tokenizer(stage_dir / "tokenizer.json")
    max_len = head.get("max_len")
    model = RewardModel(build_model(model_cfg, tokenizer.vocab_size), num_bins=int(head.num_bins), max_len=max_len and int(max_len))
    load_weights(model, stage_dir / "reward_model.safetensors")
    return model.eval(), tokenizer


def save_reward_model(model: RewardModel, stage_dir: str | Path) -> None:
    from rlhf.files import write_text
    from rlhf.models import save_weights

    save_weights(model, Path(stage_dir) / "reward_model.safetensors")
    text = f"num_bins: {model.num_bins}\n" + (f"max_len: {model.max_len}\n" if model.max_len else "")
    write_text(Path(stage_dir) / "reward_model.yaml", text)


def import_dotted(path: str):
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"reward_fn={path!r}: cannot import it (expected module.function)") from None


def model_reward_fn(model: RewardModel, tokenizer, batch_size: int = 64) -> RewardFn:
    from rlhf.sampling import join_prompt_response

    device = next(model.parameters()).device

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            chunk = zip(prompts[i : i + batch_size], responses[i : i + batch_size])
            rows = [truncate(tokenizer.encode(p), tokenizer.encode(r), model.max_len) for p, r in chunk]
            tokens, mask = join_prompt_response([p for p, _ in rows], [r + [tokenizer.eos_id] for _, r in rows], tokenizer.pad_id, device)
            out += model(tokens, mask).float().tolist()
        return out

    return score


def reward_function(ctx, reward_fn: Optional[str], reward_slot: Optional[str]) -> RewardFn:
    """The stage's reward: exactly one of a dotted path or an earlier reward_model slot."""
    if (reward_fn is None) == (reward_slot is None):
        raise ConfigError(f"stages.{ctx.slot}: set exactly one of reward_fn (a dotted path) or reward_slot (a reward_model slot)")
    if reward_fn is not None:
        return import_dotted(reward_fn)
    model, _ = load_reward_model(ctx.stage_dir_of(reward_slot))
    return model_reward_fn(model.to(next(ctx.policy.parameters()).device), ctx.tokenizer)
