"""Runs a recipe: its stages in order, each with its own Lightning Trainer, handing the
policy from stage to stage and leaving every finished stage complete on disk.

A stage module provides `Config` and `run(ctx) -> StageResult`; the orchestrator does
what every stage needs: the logger, the final evaluation, the artifacts and the marker.
Resume: complete stages are skipped (their weights loaded), an interrupted stage
continues from its last checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf import files
from rlhf.config import ENVIRONMENT_KEYS, flat_config, typed_run_config, typed_stage_config
from rlhf.errors import ConfigError, RLHFError
from rlhf.evaluation import evaluate_policy
from rlhf.models import build_model, finish_trainable, fsdp, load_hf_tokenizer, load_weights, prepare_trainable, save_model_files, save_weights
from rlhf.stage_context import StageContext
from rlhf.stages import stage_kinds
from rlhf.tasks import build_task
from rlhf.training import global_rank, mix_seed

log = logging.getLogger("rlhf")


def build_tokenizer(cfg: DictConfig, task):
    """The Hugging Face backend brings its own tokenizer; otherwise the task's."""
    if cfg.model.backend == "hf":
        return load_hf_tokenizer(cfg.model)
    return task.tokenizer


def make_logger(run_cfg: DictConfig, run_dir: Path, slot: str, kind: str, stage_cfg: Any):
    """One wandb run per stage, grouped by the recipe run, carrying the resolved config."""
    lc = run_cfg.logger
    if lc.kind == "none" or lc.mode == "disabled":
        return None
    if lc.kind != "wandb":
        raise ConfigError(f"logger.kind={lc.kind!r} is not one of: wandb, none")
    from lightning.pytorch.loggers import WandbLogger

    name = run_cfg.name or run_dir.name
    config = {
        "stage": OmegaConf.to_container(OmegaConf.structured(stage_cfg)),
        "slot": slot,
        **{k: OmegaConf.to_container(run_cfg[k]) for k in ("model", "task", "trainer", "eval")},
        "seed": run_cfg.seed,
        "order": list(run_cfg.order),
    }
    return WandbLogger(
        project=lc.project,
        entity=lc.entity,
        name=f"{name}/{slot}",
        group=name,
        job_type=kind,
        tags=list(lc.tags),
        save_dir=str(run_dir),
        offline=lc.mode == "offline",
        config=config,
    )


def finish_logger(logger, exit_code: int = 0) -> None:
    if logger is not None and global_rank() == 0:
        import wandb

        wandb.finish(exit_code=exit_code)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


SLOT_FIELDS = ("reward_slot", "previous_slot", "kl_reference")  # stage fields that name another slot


def check_slot_references(order: list[str], stage_cfgs: dict) -> None:
    """Each slot a stage names (its reward model, previous SPIN iteration, KL reference) must run
    before it in `order`."""
    for i, slot in enumerate(order):
        for field in SLOT_FIELDS:
            named = getattr(stage_cfgs[slot], field, None)
            if named is not None and named not in order[:i]:
                raise ConfigError(f"stages.{slot}.{field}={named!r}: no such slot runs before {slot!r} in order={order}")


def check_accelerator(trainer_cfg) -> None:
    """A GPU asked for on a machine without one fails now, in one line, not inside Lightning."""
    accelerator = str(trainer_cfg.accelerator).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        cpu = "trainer=fsdp_cpu" if fsdp.is_fsdp(trainer_cfg) else "trainer=default or trainer=ddp_cpu"
        raise ConfigError(f"trainer.accelerator={trainer_cfg.accelerator}: no CUDA GPU is available on this machine; run on the CPU ({cpu})")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps: Apple's MPS is not available on this machine; run on the CPU (trainer=default)")


def config_changes(saved: DictConfig, new: DictConfig) -> list[str]:
    """`key: old -> new` for every setting (dotted key) that differs, environment keys aside."""
    old, now = flat_config(saved), flat_config(new)
    keys = sorted(set(old) | set(now), key=lambda k: (k.split(".")[0] != "order", k))
    return [f"{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in keys if old.get(k) != now.get(k) and not k.startswith(ENVIRONMENT_KEYS)]


def check_same_run(run_dir: Path, cfg: DictConfig, resuming: bool = False) -> None:
    """Re-running into a run dir continues its run only with the settings it ran with: anything
    else would train nothing new (its stages are complete) or mix settings, and overwrite the
    record of what its weights saw. With `resuming` (resume=DIR key=value), the settings of
    stages not yet complete may change (a lower lr after a non-finite loss, say)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return
    open_slots = [slot for i, slot in enumerate(cfg.order) if not files.is_complete(Path(run_dir) / "stages" / f"{i:02d}_{slot}")]
    changed = [
        c for c in config_changes(typed_run_config(OmegaConf.load(path)), cfg)
        if not (resuming and c.startswith(tuple(f"stages.{slot}." for slot in open_slots)))
    ]
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({'; '.join(changed[:3])}{more}): "
            f"continue it with its own command (or resume={run_dir}), or start a new run in another hydra.run.dir"
        )


# learning rates above these are from-scratch settings; a pretrained checkpoint usually wants
# about TRL's defaults (SFTTrainer 2e-5, DPOTrainer 1e-6; RL trainers 1e-6 to 1e-5)
PRETRAINED_LR_CEILING = {"pretrain": 1e-4, "sft": 1e-4, "reward_model": 1e-4, "eft": 1e-4}
PRETRAINED_LR_CEILING_DEFAULT = 2e-5  # the preference and RL stages
TRL_LR = {"sft": "2e-5", "pretrain": "2e-5", "reward_model": "1e-5", "eft": "2e-5"}


def warn_from_scratch_settings(cfg: DictConfig, stage_cfgs: dict) -> None:
    """On a pretrained (Hugging Face) checkpoint, name each stage whose learning rate or NLL
    weight is a from-scratch setting: the defaults here are measured on models trained from
    nothing, where a pretrained model's would barely move them."""
    if cfg.model.backend != "hf":
        return
    for slot, stage in stage_cfgs.items():
        ceiling = PRETRAINED_LR_CEILING.get(stage.kind, PRETRAINED_LR_CEILING_DEFAULT)
        if stage.lr > ceiling:
            log.warning(
                "stages.%s.lr=%g is a from-scratch learning rate; on a pretrained checkpoint TRL's default is about %s: set stages.%s.lr",
                slot, stage.lr, TRL_LR.get(stage.kind, "1e-6"), slot,
            )
        if getattr(stage, "nll_weight", 0) >= 1.0:
            log.warning("stages.%s.nll_weight=%g keeps a from-scratch model's DPO stable; on a pretrained checkpoint TRL uses none (set 0 or about 0.2, RPO)", slot, stage.nll_weight)


def run_recipe(cfg: DictConfig, run_dir: Path, resuming: bool = False) -> dict[str, dict[str, float]]:
    """Run (or resume) every stage of `cfg` in `run_dir`; returns each slot's final metrics.
    `resuming` (resume=DIR): stages not yet complete may run with changed settings."""
    cfg = typed_run_config(cfg)
    # every stage's config, its references to other slots and the accelerator are checked
    # here, before the first stage trains: a mistake in the last stage costs no training
    stage_cfgs = {slot: typed_stage_config(slot, cfg.stages[slot]) for slot in cfg.order}
    check_slot_references(list(cfg.order), stage_cfgs)
    check_accelerator(cfg.trainer)
    fsdp.check_config(cfg.trainer, cfg.model, list(cfg.order), stage_cfgs)  # what cannot run sharded yet
    warn_from_scratch_settings(cfg, stage_cfgs)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    run_dir = Path(run_dir)
    check_same_run(run_dir, cfg, resuming)  # before anything is written: a run dir's record never lies
    task = build_task(cfg.task, run_dir, global_rank())
    tokenizer = build_tokenizer(cfg, task)
    torch.manual_seed(cfg.seed)
    policy = build_model(cfg.model, tokenizer.vocab_size)
    if global_rank() == 0:
        files.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))

    kinds = stage_kinds()
    completed: dict[str, Path] = {}
    results: dict[str, dict[str, float]] = {}
    weights_to_load: Optional[Path] = None
    for index, slot in enumerate(cfg.order):
        stage_cfg = stage_cfgs[slot]
        stage_dir = run_dir / "stages" / f"{index:02d}_{slot}"
        if files.is_complete(stage_dir):
            log.info("stage %s: complete on disk, skipped", slot)
            completed[slot] = stage_dir
            weights_to_load = stage_dir / "policy.safetensors"
            results[slot] = files.read_json(stage_dir / "metrics.json")
            continue
        if weights_to_load is not None:
            load_weights(policy, weights_to_load)
            weights_to_load = None
        log.info("stage %s (%s): starting in %s", slot, stage_cfg.kind, stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        logger = make_logger(cfg, run_dir, slot, stage_cfg.kind, stage_cfg)
        ctx = StageContext(
            slot=slot,
            cfg=stage_cfg,
            run_cfg=cfg,
            stage_dir=stage_dir,
            policy=prepare_trainable(policy, stage_cfg),  # LoRA / last-N layers (rlhf/models/freezing.py)
            task=task,
            tokenizer=tokenizer,
            seed=mix_seed(cfg.seed, slot),
            logger=logger,
            completed=dict(completed),
        )
        try:
            result = kinds[stage_cfg.kind].run(ctx)
        except BaseException:  # an error or Ctrl-C: wandb's closing lines come before ours, not after
            finish_logger(logger, exit_code=1)
            raise
        # trainer.strategy=fsdp: every rank gathers the whole weights into a plain model (rlhf/models/fsdp.py)
        policy = fsdp.gather_policy(result.policy, lambda: prepare_trainable(build_model(cfg.model, tokenizer.vocab_size), stage_cfg))
        policy = finish_trainable(policy, stage_cfg, stage_dir, global_rank() == 0)  # merge LoRA
        metrics = dict(result.metrics)
        if global_rank() == 0:
            eval_metrics, samples = evaluate_policy(policy, task, tokenizer, cfg.eval, progress=cfg.trainer.progress_bar)
            metrics.update(eval_metrics)
            save_weights(policy, stage_dir / "policy.safetensors")
            save_model_files(stage_dir, cfg.model, tokenizer)
            files.write_text(stage_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(stage_cfg)))
            files.write_jsonl(stage_dir / "samples.jsonl", samples)
            files.write_json(stage_dir / "metrics.json", metrics)
            if logger is not None:
                logger.log_metrics(eval_metrics)
                logger.log_text(key="eval/samples", columns=["prompt", "response", "score"], data=[[s["prompt"], s["response"], s["score"]] for s in samples])
            files.mark_complete(stage_dir)
            shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
            log.info("stage %s: done %s", slot, {k: round(v, 4) for k, v in eval_metrics.items()})
        _barrier()
        finish_logger(logger)
        completed[slot] = stage_dir
        results[slot] = metrics
    return results


def load_run_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise RLHFError(f"resume={run_dir}: no such run dir (to continue a run if DIR holds one and start it otherwise, re-run its command with hydra.run.dir=DIR)")
    if not path.exists():
        raise RLHFError(f"resume={run_dir}: not a run dir (no config.yaml)")
    return OmegaConf.load(path)
