"""`python -m rlhf run ...` that also writes each optimizer step's loss (the mean over ranks) to
the JSON file $RLHF_LOSS_CURVE, every stage's in order, and whether the last stage's policy (or
reward model) trained as DTensors (sharded).

A script, not a test: Lightning's launcher re-runs it in the second process (tests/test_fsdp.py)."""

import json
import os
import sys

import torch
from lightning.pytorch.callbacks import Callback

import rlhf.stage_context
from rlhf.cli import main


class LossCurve(Callback):
    def __init__(self, path: str):
        self.path, self.losses, self.sharded = path, [], None

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        trained = pl_module.model if hasattr(pl_module, "model") else pl_module.policy  # a reward model, or the policy
        self.sharded = all(isinstance(p, DTensor) for p in trained.parameters())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs or "loss" not in outputs:  # manual optimization (GRPO, PPO): the rollout's loss, averaged over ranks
            row = pl_module.history[-1]
            self.losses.append(row["train/loss"] if "train/loss" in row else row["train/policy_loss"] + row["train/value_loss"])
            return
        loss = outputs["loss"].detach().clone()
        if trainer.world_size > 1:
            torch.distributed.all_reduce(loss)
            loss /= trainer.world_size
        self.losses.append(loss.item())

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:  # "losses": this stage's; "stages": every stage's so far, in order
            earlier = json.load(open(self.path))["stages"] if os.path.exists(self.path) else []
            with open(self.path, "w") as f:
                json.dump({"losses": self.losses, "stages": [*earlier, self.losses], "sharded": self.sharded, "world_size": trainer.world_size}, f)


_fit = rlhf.stage_context.fit


def fit_with_curve(module, make_batch, *, callbacks=None, **kwargs):
    return _fit(module, make_batch, callbacks=[*(callbacks or []), LossCurve(os.environ["RLHF_LOSS_CURVE"])], **kwargs)


rlhf.stage_context.fit = fit_with_curve

if __name__ == "__main__":
    sys.exit(main())
