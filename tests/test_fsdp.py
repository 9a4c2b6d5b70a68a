"""trainer=fsdp_cpu / fsdp (issue #16): every stage sharded per transformer block (FSDP2 through
Lightning's ModelParallelStrategy). Pretraining, SFT, the reward model and DPO follow the
one-process loss curves and weights; the stages that sample (SPIN, self-rewarding and
external-reward DPO, EFT, GRPO, PPO) follow the 2-process DDP run's; what cannot run sharded
yet fails at config time in one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, run_cli
from rlhf.cli import compose
from rlhf.errors import ConfigError
from rlhf.models import CausalLM, ModelConfig, load_policy
from rlhf.orchestrator import run_recipe


def test_blocks_are_a_layers_attention_and_feed_forward():
    from x_transformers.x_transformers import Attention, FeedForward

    from rlhf.models import transformer_blocks

    blocks = transformer_blocks(CausalLM(ModelConfig(dim=16, depth=3, heads=2), 20))
    assert [[type(m) for m in b] for b in blocks] == [[Attention, FeedForward]] * 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["recipe=sft", "model.compile=true"], "model.compile=true cannot run under trainer.strategy=fsdp yet"),
        (["recipe=sft", "trainer.accelerator=auto"], "trainer.strategy=fsdp needs trainer.accelerator=cpu or gpu"),
    ],
)
def test_what_cannot_run_sharded_fails_before_training(tmp_path, overrides, message):
    cfg = compose([*overrides, *TINY, "trainer=fsdp_cpu"])
    with pytest.raises(ConfigError, match=message):
        run_recipe(cfg, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_cpu_offload_without_fsdp_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.fsdp_cpu_offload=true needs trainer.strategy=fsdp"):
        run_recipe(compose(["recipe=sft", *TINY, "trainer=ddp_cpu", "trainer.fsdp_cpu_offload=true"]), tmp_path)
    assert not any(tmp_path.iterdir())


def test_cpu_offload_keeps_the_shards_in_cpu_memory():
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    from rlhf.models.fsdp import offload_policy

    assert isinstance(offload_policy(True), CPUOffloadPolicy) and type(offload_policy(False)) is OffloadPolicy


def test_a_stage_kind_that_cannot_shard_is_named():
    from types import SimpleNamespace

    from rlhf.models.fsdp import check_config

    trainer = SimpleNamespace(strategy="fsdp", accelerator="cpu")
    stage = SimpleNamespace(kind="my_stage", lora=SimpleNamespace(enabled=False))
    with pytest.raises(ConfigError, match="stages.x: stage kind 'my_stage' cannot run under trainer.strategy=fsdp yet"):
        check_config(trainer, SimpleNamespace(backend="xtransformers", compile=False), ["x"], {"x": stage})


@pytest.mark.slow
def test_a_sharded_stage_killed_mid_way_resumes_to_identical_weights(tmp_path):
    # PPO sharded on 2 processes (its value head a group of its own; the KL controller and history
    # in the checkpoint's metadata): kill -9 once its first distributed checkpoint is in place,
    # then resume=DIR skips the complete SFT stage and continues PPO from the shards
    args = ["recipe=ppo", "order=[sft,ppo]", *TINY, "trainer=fsdp_cpu", "trainer.checkpoint_every=1", "stages.sft.max_steps=4",
            *[f"stages.ppo.{key}" for key in ("reward_slot=null", "max_steps=3", "rollout_batch_size=8", "minibatch_size=4", "max_new_tokens=6", "eval_every=0")]]
    run_cli("run", *args, f"hydra.run.dir={tmp_path / 'whole'}")
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rlhf", "run", *args, f"hydra.run.dir={run}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run / "stages" / "01_ppo" / "checkpoints" / "last.ckpt").is_dir():
            assert proc.poll() is None and time.time() < deadline, "the run finished before the kill point"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "stages" / "01_ppo" / "COMPLETE").exists()
    resumed = run_cli("run", f"resume={run}")
    assert "stage sft: complete on disk, skipped" in resumed.stdout + resumed.stderr
    assert not (run / "stages" / "01_ppo" / "checkpoints").exists()  # removed once the stage is complete
    whole, killed = (load_file(str(tmp_path / name / "stages" / "01_ppo" / "policy.safetensors")) for name in ("whole", "killed"))
    assert whole.keys() == killed.keys()
    for key in whole:
        assert torch.equal(whole[key], killed[key]), key


def test_a_sharded_checkpoint_moved_aside_by_a_kill_is_still_found(tmp_path):
    # a sharded checkpoint is a directory, replaced by two renames: last.ckpt -> last.ckpt.old, then
    # last.ckpt.tmp -> last.ckpt; a kill between them leaves only last.ckpt.old
    from rlhf.training import latest_checkpoint

    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "last.ckpt.old").mkdir()
    (tmp_path / "last.ckpt.tmp").mkdir()  # a save cut short: never loaded
    assert latest_checkpoint(tmp_path) == tmp_path / "last.ckpt.old"
    (tmp_path / "last.ckpt").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "last.ckpt"


@pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")
def test_fsdp_without_a_gpu_names_the_cpu_config(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu: no CUDA GPU .*\(trainer=fsdp_cpu\)"):
        run_recipe(compose(["recipe=sft", *TINY, "trainer=fsdp"]), tmp_path)


def _run_with_loss_curve(run_dir, trainer: str, recipe: tuple[str, ...] = ("recipe=sft", "stages.sft.max_steps=5")) -> tuple[dict, str]:
    """The loss curve of the recipe's last stage (the script writes each stage's over the last)."""
    # every response is 8 sorted letters: each process's half of a batch holds as many response
    # tokens as the other, so the mean of the two halves' losses is the whole batch's loss
    args = [*recipe, *TINY, f"trainer={trainer}", "task.families=[sort]", "task.sort_min_len=8", "task.sort_max_len=8",
            "stages.sft.batch_size=8", "stages.sft.warmup_steps=1", f"hydra.run.dir={run_dir}"]
    curve = run_dir.parent / f"{run_dir.name}.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLHF_LOSS_CURVE": str(curve)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fsdp_loss_curve.py"), "run", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(curve.read_text()), proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_hugging_face_model_shards_per_decoder_layer_and_follows_one_process(tmp_path):
    # model=hf: the sharding groups are the classes the model names in `_no_split_modules`
    # (LlamaDecoderLayer here), the embedding and head the root group
    pytest.importorskip("transformers")
    from rlhf.models.hf import make_tiny_checkpoint
    from rlhf.tasks.builtin import solved_texts

    checkpoint = make_tiny_checkpoint(tmp_path / "llama", solved_texts(), arch="llama")
    recipe = ("recipe=sft", "model=hf", f"model.path={checkpoint}", "stages.sft.max_steps=3")
    one, _ = _run_with_loss_curve(tmp_path / "one", "default", recipe)
    two, _ = _run_with_loss_curve(tmp_path / "fsdp", "fsdp_cpu", recipe)
    assert two["sharded"] and two["stages"][0] == pytest.approx(one["stages"][0], rel=1e-4)


RM_LR = 1e-4


@pytest.mark.slow
def test_pretrain_sft_reward_model_and_dpo_under_fsdp_follow_the_one_process_run(tmp_path):
    # the reward model sharded (its trunk's blocks; head and the rest in the root group) and
    # gathered whole for its file; DPO's policy sharded, its reference precomputed whole on each
    # process over that process's pairs, the shared-prompt rows through forward_packed; a held-out
    # evaluation due during DPO (eval_every=2) is skipped when sharded instead of leaving rank 1 waiting
    recipe = ("recipe=dpo", "+stage@stages.pretrain=pretrain", "+stage@stages.rm=reward_model", "order=[pretrain,sft,rm,dpo]",
              "stages.pretrain.max_steps=2", "stages.sft.max_steps=2", "stages.rm.max_steps=3", "stages.rm.batch_size=8",
              "stages.rm.warmup_steps=1", "stages.dpo.max_steps=4", "stages.dpo.batch_size=8", "stages.dpo.warmup_steps=1",
              "stages.dpo.eval_every=2", f"stages.rm.lr={RM_LR}")
    one, _ = _run_with_loss_curve(tmp_path / "one", "default", recipe)
    two, output = _run_with_loss_curve(tmp_path / "fsdp", "fsdp_cpu", recipe)
    assert "GLOBAL_RANK: 1" in output and two["world_size"] == 2 and two["sharded"]
    assert [len(losses) for losses in one["stages"]] == [2, 2, 3, 4]
    for sharded_curve, whole_curve in zip(two["stages"], one["stages"]):
        assert sharded_curve == pytest.approx(whole_curve, rel=1e-4)
    fsdp_run, one_run = tmp_path / "fsdp", tmp_path / "one"
    assert (fsdp_run / "stages" / "03_dpo" / "COMPLETE").exists() and not (fsdp_run / "stages" / "03_dpo" / "eval_during.jsonl").exists()
    sharded, whole = (load_policy(run / "stages" / "03_dpo")[0].state_dict() for run in (fsdp_run, one_run))
    sharded_rm, whole_rm = (load_file(str(run / "stages" / "02_rm" / "reward_model.safetensors")) for run in (fsdp_run, one_run))
    assert sharded_rm.keys() == whole_rm.keys()
    for key in whole:
        torch.testing.assert_close(sharded[key], whole[key], rtol=1e-4, atol=1e-5, msg=key)
    for key in whole_rm:
        # the head's bias has no gradient in exact arithmetic (Bradley-Terry sees reward
        # differences only): AdamW turns rounding noise into lr-sized steps of either sign
        atol = 3 * RM_LR if key == "head.bias" else 1e-5
        torch.testing.assert_close(sharded_rm[key], whole_rm[key], rtol=1e-4, atol=atol, msg=key)


ONLINE = {
    # KTO: the reference point from every process's mismatched rows, all-gathered (compared with
    # DDP, whose processes see the same rows; one process would pair other rows). lr 1e-4: AdamW's
    # first steps are ~lr * sign(grad), so a near-zero gradient entry's rounding moves it by ~lr
    "kto": ("recipe=kto", "stages.sft.max_steps=2", "stages.kto.max_steps=2", "stages.kto.batch_size=8", "stages.kto.warmup_steps=0", "stages.kto.lr=1e-4"),
    # GRPO: each rollout sampled and scored with the whole weights, gathered once per rollout; its
    # loss is ~0 at one update per rollout (ratio 1, zero-mean advantages), so the weights are the check
    "grpo": ("recipe=grpo", "stages.sft.max_steps=2", *[f"stages.grpo.{key}" for key in ("max_steps=2", "rollout_batch_size=4", "group_size=4", "max_new_tokens=8", "eval_every=1")]),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(ONLINE))
def test_online_stages_under_fsdp_follow_ddp(tmp_path, recipe):
    # each process samples its share of a round with its own generator, so the reference is the
    # 2-process DDP run (the same rows), not one process
    args = (*ONLINE[recipe], "task.arrange_min_len=5", "task.arrange_max_len=6")
    ddp, ddp_output = _run_with_loss_curve(tmp_path / "ddp", "ddp_cpu", args)
    fsdp, output = _run_with_loss_curve(tmp_path / "fsdp", "fsdp_cpu", args)
    assert fsdp["sharded"] and not ddp["sharded"] and fsdp["world_size"] == ddp["world_size"] == 2
    assert [len(losses) for losses in fsdp["stages"]][1:] == [2] * (len(ddp["stages"]) - 1)
    for sharded_curve, ddp_curve in zip(fsdp["stages"], ddp["stages"]):
        assert sharded_curve == pytest.approx(ddp_curve, rel=1e-4, abs=1e-7)
    last = sorted((tmp_path / "ddp" / "stages").iterdir())[-1].name
    sharded, whole = (load_policy(tmp_path / run / "stages" / last)[0].state_dict() for run in ("fsdp", "ddp"))
    for key in whole:
        torch.testing.assert_close(sharded[key], whole[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_lora_and_last_n_layers_under_fsdp_follow_ddp(tmp_path):
    # DPO with LoRA (adapters sharded with their blocks, the base weights frozen in the same
    # groups; its reference the base weights), PPO with LoRA (sampling from the whole weights
    # gathered into a LoRA-shaped model, its reference the adapters switched off) and GRPO
    # training its last block only; adapters merged at each stage's end as under DDP
    recipe = ("recipe=dpo", "+stage@stages.ppo=ppo", "+stage@stages.grpo=grpo", "order=[sft,dpo,ppo,grpo]", "stages.sft.max_steps=3",
              "stages.dpo.max_steps=2", "stages.dpo.batch_size=8", "stages.dpo.lora.enabled=true", "stages.dpo.lr=1e-3",
              *[f"stages.ppo.{key}" for key in ("lora.enabled=true", "lr=1e-3", "max_steps=2", "rollout_batch_size=8", "minibatch_size=4", "max_new_tokens=6", "eval_every=0")],
              *[f"stages.grpo.{key}" for key in ("train_last_n_layers=1", "max_steps=2", "rollout_batch_size=4", "group_size=4", "max_new_tokens=6", "eval_every=0")])
    ddp, _ = _run_with_loss_curve(tmp_path / "ddp", "ddp_cpu", recipe)
    fsdp, _ = _run_with_loss_curve(tmp_path / "fsdp", "fsdp_cpu", recipe)
    assert fsdp["sharded"] and [len(losses) for losses in fsdp["stages"]] == [3, 2, 2, 2]
    for sharded_curve, ddp_curve in zip(fsdp["stages"], ddp["stages"]):
        assert sharded_curve == pytest.approx(ddp_curve, rel=1e-4, abs=1e-7)
    for slot in ("01_dpo", "02_ppo", "03_grpo"):
        sharded, whole = (load_policy(tmp_path / run / "stages" / slot)[0].state_dict() for run in ("fsdp", "ddp"))
        assert not any("lora" in key for key in sharded)  # merged
        for key in whole:
            torch.testing.assert_close(sharded[key], whole[key], rtol=1e-4, atol=1e-5, msg=f"{slot} {key}")


@pytest.mark.slow
def test_two_nodes_launched_by_torchrun_match_two_local_processes(tmp_path):
    # the multi-node launch the README shows, as two "nodes" of one process each on this machine:
    # torchrun starts each node's process, Lightning finds its rank in torchrun's environment
    # (no launcher of its own), and the run is the same as Lightning's 2-process launch
    args = ["recipe=sft", *TINY, "stages.sft.max_steps=3", "trainer=fsdp_cpu"]
    run_cli("run", *args, f"hydra.run.dir={tmp_path / 'local'}")
    nodes = [subprocess.Popen(["torchrun", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--master_addr=127.0.0.1",
                               "--master_port=29613", "-m", "rlhf", "run", *args, "trainer.devices=1", "trainer.num_nodes=2",
                               f"hydra.run.dir={tmp_path / 'nodes'}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    local, nodes = (load_file(str(tmp_path / name / "stages" / "00_sft" / "policy.safetensors")) for name in ("local", "nodes"))
    for key in local:
        assert torch.equal(local[key], nodes[key]), key


@pytest.mark.slow
def test_the_full_recipe_under_fsdp_follows_ddp(tmp_path):
    # SFT, SPIN (its opponent whole), EFT (its own answers from the whole weights), two
    # self-rewarding iterations and external-reward DPO (each round answered and judged by the
    # whole weights, gathered once; the end-of-stage judge measurement too) and PPO (sampled whole once
    # per rollout; value head its own group), each sharded on 2 processes; the round-start
    # evaluations (rank 0 alone) are skipped when sharded. Each process samples its own share, so
    # the reference is the 2-process DDP run (the same rows), not one process
    iteration = ("steps_per_round=1", "max_steps=2", "batch_size=4", "num_candidates=3", "judge.num_samples=2",
                 "judge.score_regex='(\\d)'", "eval_prompts=4", "max_new_tokens=8", "judge_batch_size=4", "judge.temperature=1.0")
    recipe = ("recipe=full", "task=easy", "stages.sft.max_steps=30", "stages.sft.batch_size=16",
              "+stage@stages.eft=eft", "order=[sft,spin,eft,dpo_iter1,dpo_iter2,erdpo,ppo]",
              "stages.eft.max_steps=2", "stages.eft.num_prompts=8", "stages.eft.batch_size=8",
              *[f"stages.{slot}.{key}" for slot in ("spin", "erdpo") for key in ("max_steps=2", "steps_per_round=1", "batch_size=8", "max_new_tokens=8")],
              *[f"stages.ppo.{key}" for key in ("max_steps=2", "rollout_batch_size=8", "minibatch_size=4", "max_new_tokens=8", "eval_every=1")],
              *[f"stages.{slot}.{key}" for slot in ("dpo_iter1", "dpo_iter2") for key in iteration])
    ddp, ddp_output = _run_with_loss_curve(tmp_path / "ddp", "ddp_cpu", recipe)
    fsdp, output = _run_with_loss_curve(tmp_path / "fsdp", "fsdp_cpu", recipe)
    assert fsdp["sharded"] and fsdp["world_size"] == 2 and len(list((tmp_path / "fsdp").glob("stages/*/COMPLETE"))) == 7
    assert [len(losses) for losses in fsdp["stages"]] == [30, 2, 2, 2, 2, 2, 2]
    for sharded_curve, ddp_curve in zip(fsdp["stages"], ddp["stages"]):
        assert sharded_curve == pytest.approx(ddp_curve, rel=1e-4, abs=1e-7)
    for slot in ("01_spin", "06_ppo"):
        sharded, whole = (load_policy(tmp_path / run / "stages" / slot)[0].state_dict() for run in ("fsdp", "ddp"))
        for key in whole:
            torch.testing.assert_close(sharded[key], whole[key], rtol=1e-4, atol=1e-5, msg=f"{slot} {key}")
    assert "round 0 start" in ddp_output and "round 0 start" not in output  # evaluated under DDP only
