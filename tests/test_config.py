"""Recipes compose into typed configs; the command-line edits in the README work; mistakes fail early."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from rlhf.config import CONF_DIR, register_configs, typed_run_config, typed_stage_config
from rlhf.errors import ConfigError


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_configs()


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_recipe_and_override():
    cfg = _compose("recipe=sft", "stages.sft.lr=3e-4", "model=medium")
    assert list(cfg.order) == ["sft"]
    assert cfg.stages.sft.lr == 3e-4 and cfg.stages.sft.kind == "sft"
    assert cfg.model.dim == 512
    assert typed_stage_config("sft", cfg.stages.sft).lr == 3e-4


def test_typo_and_wrong_type_fail_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("recipe=sft", "stages.sft.betaa=0.1")
    assert "betaa" in str(err.value.__cause__ or err.value)
    with pytest.raises(ConfigCompositionException) as err:
        _compose("recipe=sft", "stages.sft.lr=fast")
    assert "lr" in str(err.value.__cause__ or err.value) or "fast" in str(err.value.__cause__ or err.value)


def test_swap_insert_and_remove_stages():
    swapped = _compose("recipe=sft", "stage@stages.sft=pretrain")
    assert swapped.stages.sft.kind == "pretrain"
    inserted = _compose("recipe=sft", "+stage@stages.warmup=pretrain", "order=[warmup,sft]")
    assert list(inserted.order) == ["warmup", "sft"] and inserted.stages.warmup.kind == "pretrain"
    removed = _compose("recipe=pretrain_sft", "~stage@stages.pretrain", "order=[sft]")
    assert list(removed.stages) == ["sft"]
    typed_run_config(removed)


def test_unknown_recipe_fails():
    with pytest.raises(Exception, match="recipe"):
        _compose("recipe=nope")


def test_order_naming_a_missing_slot_fails():
    cfg = _compose("recipe=sft", "order=[sft,dpo_iter9]")
    with pytest.raises(ConfigError, match="dpo_iter9"):
        typed_run_config(cfg)


def test_unknown_stage_kind_fails():
    with pytest.raises(ConfigError, match="unknown stage kind 'alchemy'"):
        typed_stage_config("x", OmegaConf.create({"kind": "alchemy"}))


def test_every_recipe_composes_and_validates():
    from rlhf.config import RECIPES_DIR

    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        cfg = _compose(f"recipe={path.stem}")
        typed = typed_run_config(cfg)
        for slot in typed.order:
            typed_stage_config(slot, typed.stages[slot])


def test_compile_is_only_for_the_x_transformers_backend():
    from rlhf.models import ModelConfig, build_model

    with pytest.raises(ConfigError, match="model.compile"):
        build_model(ModelConfig(backend="hf", path="/nonexistent", compile=True), vocab_size=10)


def test_a_pretrained_checkpoint_is_warned_of_from_scratch_settings(caplog):
    from omegaconf import OmegaConf

    from rlhf.config import typed_stage_config
    from rlhf.orchestrator import warn_from_scratch_settings

    stages = {"sft": typed_stage_config("sft", {"kind": "sft"}), "dpo": typed_stage_config("dpo", {"kind": "dpo", "lr": 1e-6, "nll_weight": 0.0})}
    with caplog.at_level("WARNING", logger="rlhf"):
        warn_from_scratch_settings(OmegaConf.create({"model": {"backend": "hf"}}), stages)
    assert len(caplog.records) == 1 and "stages.sft.lr=0.001 is a from-scratch learning rate" in caplog.text and "2e-5" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhf"):
        warn_from_scratch_settings(OmegaConf.create({"model": {"backend": "xtransformers"}}), stages)
    assert not caplog.records
