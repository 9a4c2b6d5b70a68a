"""Typed config schemas and their registration with Hydra.

Every default lives once, in a dataclass here or beside its stage. YAML files in conf/
and recipes/ state only what differs. Each stage kind's schema is registered as
`stage/<kind>` in Hydra's ConfigStore, so a recipe slot `/stage@stages.x: dpo` gets
the typed DPO schema: a typo or a wrong type in an override fails before training,
naming the key. Recipes live in the top-level `recipes/` folder and are registered as
the config group `recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from rlhf.errors import ConfigError
from rlhf.models import LoRAConfig, ModelConfig
from rlhf.tasks import TaskConfig

# settings of where and how a run executes, not of what it trains: a run continues under other
# values of these, and `rlhf report` does not name runs by them
ENVIRONMENT_KEYS = ("name", "trainer.num_threads", "trainer.progress_bar", "trainer.log_every", "trainer.checkpoint_every", "logger.", "eval.batch_size")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
RECIPES_DIR = REPO_ROOT / "recipes"


@dataclass
class StageConfig:
    """Fields every training stage has. A stage's own schema adds its fields (and may change these defaults)."""

    kind: str = MISSING
    max_steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    accumulate_grad_batches: int = 1
    # which parameters train (applied to the policy by the orchestrator: rlhf/models/freezing.py)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train_last_n_layers: Optional[int] = None  # None trains every layer


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by every stage."""

    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"  # a Lightning strategy name, or fsdp: the policy sharded per block (rlhf/models/fsdp.py)
    num_nodes: int = 1
    # trainer.strategy=fsdp: keep the sharded parameters, gradients and optimizer state in CPU
    # memory, copied to the GPU just before each block runs (FSDP2's CPUOffloadPolicy; the
    # optimizer steps on the CPU): less GPU memory, slower steps
    fsdp_cpu_offload: bool = False
    precision: str = "32-true"
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    log_every: int = 10
    progress_bar: bool = True
    num_threads: Optional[int] = None  # torch intra-op threads; None keeps torch's default


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | none
    project: str = "rlhf"
    mode: str = "offline"  # offline (no account, no network) | online | disabled
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """The evaluation every stage ends with, on the task's held-out prompts."""

    num_prompts: int = 200
    max_new_tokens: int = 24
    batch_size: int = 100
    num_logged_samples: int = 8
    # headroom (rlhf/evaluation.py): k sampled answers to each of the first sample_prompts
    # prompts give eval/pass@k, eval/best_of_k and eval/sample_exact. Temperature 1 samples the
    # policy's own distribution, the one on-policy RL explores, so pass@k says what RL could
    # find; a lower temperature would flatter it. Costs about k x sample_prompts / num_prompts
    # greedy passes (4x by default); samples_per_prompt=0 turns it off.
    samples_per_prompt: int = 8
    sample_temperature: float = 1.0
    sample_prompts: int = 100  # at most num_prompts: the first of the greedy pass's prompts

    def __post_init__(self):
        if self.samples_per_prompt < 0 or self.sample_prompts < 0:
            raise ConfigError("eval.samples_per_prompt and eval.sample_prompts must be >= 0 (0 turns sampling off)")
        if self.samples_per_prompt > 0 and not self.sample_temperature > 0:
            raise ConfigError(f"eval.sample_temperature={self.sample_temperature} must be > 0 (greedy samples are all the same)")


@dataclass
class RunConfig:
    order: list[str] = MISSING
    stages: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    name: Optional[str] = None  # run name in wandb; defaults to the recipe and run dir
    resume: Optional[str] = None


def register_configs() -> None:
    """Put the schemas, stage kinds and recipes into Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    from rlhf.stages import stage_kinds

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for kind, module in stage_kinds().items():
        cs.store(group="stage", name=kind, node=module.Config(kind=kind))
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        node = OmegaConf.load(path)
        cs.store(group="recipe", name=path.stem, node=node, package="_global_")


def flat_config(cfg: Any) -> dict[str, Any]:
    """A config (DictConfig or dict) as {dotted key: value}; lists stay whole values."""
    out: dict[str, Any] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg, "")
    return out


def typed_stage_config(slot: str, node: Any):
    """Validate one slot's config against its kind's schema and return the dataclass instance."""
    from rlhf.stages import stage_kinds

    kinds = stage_kinds()
    kind = node.get("kind") if isinstance(node, (dict, DictConfig)) else None
    if kind not in kinds:
        raise ConfigError(f"stages.{slot}: unknown stage kind {kind!r}; known kinds: {', '.join(sorted(kinds))}")
    schema = OmegaConf.structured(kinds[kind].Config(kind=kind))
    try:
        merged = OmegaConf.merge(schema, node)
    except Exception as err:  # omegaconf names the key and the problem
        raise ConfigError(f"stages.{slot}: {err}".splitlines()[0]) from None
    try:
        typed = OmegaConf.to_object(merged)  # runs the schema's __post_init__ checks, if any
    except ConfigError as err:
        raise ConfigError(f"stages.{slot}: {err}") from None
    check_stage_fields(slot, typed)
    check = getattr(kinds[kind], "check_config", None)  # the kind's own checks, if it has any
    if check is not None:
        check(typed, slot)
    return typed


def check_stage_fields(slot: str, cfg: StageConfig) -> None:
    """The fields every stage shares, checked when the run's config is read (before any stage
    trains): one ConfigError naming the first wrong key."""
    import math

    rules = (
        ("max_steps", cfg.max_steps >= 1, ">= 1"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "a finite number > 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, ">= 0"),
        ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
        ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("grad_clip", cfg.grad_clip >= 0, ">= 0 (0: no clipping)"),
        ("accumulate_grad_batches", cfg.accumulate_grad_batches >= 1, ">= 1"),
        ("train_last_n_layers", cfg.train_last_n_layers is None or cfg.train_last_n_layers >= 0, ">= 0 or null"),
    )
    for key, ok, want in rules:
        if not ok:
            raise ConfigError(f"stages.{slot}.{key} must be {want}, got {getattr(cfg, key)}")


def typed_run_config(cfg: DictConfig) -> DictConfig:
    """Merge a composed or saved run config into the schema; check order against slots."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        # resolve `${task.data}`-style interpolations now: stage configs are validated one by one later
        OmegaConf.resolve(merged)
    except Exception as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    if OmegaConf.is_missing(merged, "order") or not merged.order:
        raise ConfigError("the run has no stages: set `order` (a recipe sets it)")
    for slot in merged.order:
        if slot not in merged.stages:
            raise ConfigError(
                f"order names slot {slot!r}, which no stage fills; slots: {', '.join(merged.stages) or 'none'}"
            )
    if len(set(merged.order)) != len(merged.order):
        raise ConfigError(f"order repeats a slot: {list(merged.order)}")
    OmegaConf.to_object(merged.eval)  # EvalConfig's checks, before any stage trains
    return merged
