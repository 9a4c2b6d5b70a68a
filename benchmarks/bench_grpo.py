"""GRPO training speed in completions/s: this project's grpo stage vs TRL's GRPOTrainer.

    python -m benchmarks.bench_grpo [--steps 20] [--rounds 2] [--threads 1] [--quick] [--no-trl]

Writes benchmarks/results/grpo.json. One step = 2 prompts x 4 samples = 8 completions of
up to 32 new tokens, sampled at temperature 1, scored, and one optimizer step on them
(no reference model: TRL's default beta is 0, and ours runs with kl_coef 0, track_kl off).
Timed per step (sampling, reward, old log-probs, forward, backward, optimizer), warm-up
steps dropped, median over all rounds; rounds alternate the variants so load from other
processes falls on all of them alike.

Variants:
  - `rlhf_xtransformers`: rlhf.stages.grpo on the project's own policy, an x-transformers
    decoder of 4 layers, 256 wide (3.2 M parameters, character vocabulary).
  - `rlhf_xtransformers_compiled`: the same with `model.compile=true` (torch.compile of the
    network and the cached decode step). Its compiling falls in the dropped warm-up steps;
    `first_step_s` (each round's first step) shows what it costs.
  - `rlhf_hf_gpt2`: the same stage on a local GPT-2 checkpoint (4 layers, 256 wide, 512-token
    BPE: 3.3 M parameters) through the Hugging Face backend: the same model as TRL's run.
  - `trl`: trl.GRPOTrainer defaults on that GPT-2 checkpoint (transformers generate with its
    KV cache), num_generations 4, batch 8 completions, max_completion_length 32.
Completions counted are those generated; mean completion length is reported for each, since
a completion may end early at its EOS on either side.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from benchmarks.common import machine, write_result
from rlhf.config import EvalConfig, TrainerConfig
from rlhf.models import ModelConfig, build_model
from rlhf.stage_context import StageContext
from rlhf.tasks import TaskConfig
from rlhf.tasks.builtin import BuiltinTask, solved_texts

PROMPTS, GROUP, NEW_TOKENS = 2, 4, 32
COMPLETIONS_PER_STEP = PROMPTS * GROUP


class LightningStepTimer(L.Callback):
    def __init__(self):
        self.steps: list[float] = []

    def on_train_batch_start(self, trainer, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        self.steps.append(time.perf_counter() - self._t)


@dataclasses.dataclass
class TimedContext(StageContext):
    """The stage's real context, with a timing callback added to its Trainer."""

    timer: LightningStepTimer = dataclasses.field(default_factory=LightningStepTimer)

    def fit(self, module, make_batch, callbacks=None):
        return super().fit(module, make_batch, callbacks=[*(callbacks or []), self.timer])


def run_rlhf(model_cfg: ModelConfig, steps: int, workdir: Path) -> dict:
    from rlhf.stages import grpo

    task = BuiltinTask(TaskConfig())
    if model_cfg.backend == "hf":
        from rlhf.models import load_hf_model, load_hf_tokenizer

        policy, tokenizer = load_hf_model(model_cfg), load_hf_tokenizer(model_cfg)
    else:
        tokenizer = task.tokenizer
        torch.manual_seed(0)
        policy = build_model(model_cfg, tokenizer.vocab_size)
    trainer_cfg = TrainerConfig(accelerator="cpu", devices=1, progress_bar=False, checkpoint_every=0, log_every=10**6)
    run_cfg = OmegaConf.create({"model": dataclasses.asdict(model_cfg), "trainer": dataclasses.asdict(trainer_cfg), "eval": dataclasses.asdict(EvalConfig())})
    stage_cfg = grpo.Config(
        max_steps=steps, rollout_batch_size=PROMPTS, group_size=GROUP, max_new_tokens=NEW_TOKENS, lr=1e-6,
        kl_coef=0.0, track_kl=False, eval_every=0,
    )
    ctx = TimedContext(
        slot="grpo", cfg=stage_cfg, run_cfg=run_cfg, stage_dir=Path(tempfile.mkdtemp(dir=workdir)), policy=policy,
        task=task, tokenizer=tokenizer, seed=0, logger=None, completed={},
    )
    grpo.run(ctx)
    lengths = [row["rollout/response_length"] for row in ctx_history(ctx)]
    assert len(ctx.timer.steps) == steps
    return {"steps": ctx.timer.steps, "mean_completion_tokens": statistics.mean(lengths)}


def ctx_history(ctx) -> list[dict]:
    import json

    return [json.loads(line) for line in (ctx.stage_dir / "rollout_metrics.jsonl").read_text().splitlines()]


def run_trl(checkpoint: Path, steps: int, workdir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self._t)

    lengths: list[int] = []

    def reward(prompts, completions, completion_ids=None, **kw):
        lengths.extend(len(c) for c in completion_ids)
        return [float(len(c)) for c in completions]

    task = BuiltinTask(TaskConfig())
    rng = random.Random(0)
    prompts = [task.train_prompt(rng) for _ in range(steps * PROMPTS)]
    tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True)
    args = GRPOConfig(
        output_dir=str(Path(tempfile.mkdtemp(dir=workdir))), per_device_train_batch_size=COMPLETIONS_PER_STEP,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, max_steps=steps, learning_rate=1e-6,
        lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        seed=0, dataloader_num_workers=0,
    )
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    assert len(timer.steps) == steps
    return {"steps": timer.steps, "mean_completion_tokens": statistics.mean(lengths)}


def summarize(runs: list[dict], warmup: int) -> dict:
    timed = [s for run in runs for s in run["steps"][warmup:]]
    median = statistics.median(timed)
    return {
        "median_step_s": median,
        "completions_per_s": COMPLETIONS_PER_STEP / median,
        "mean_completion_tokens": statistics.mean(run["mean_completion_tokens"] for run in runs),
        "steps_timed": len(timed),
        "first_step_s": [run["steps"][0] for run in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, 1 round, not written")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (and the GPT-2 variant)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.warmup = 4, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    xt = ModelConfig(dim=256, depth=4, heads=4, max_seq_len=256)
    compiled = dataclasses.replace(xt, compile=True)
    runs: dict[str, list[dict]] = {"rlhf_xtransformers": [], "rlhf_xtransformers_compiled": [], "rlhf_hf_gpt2": [], "trl": []}
    start_load = machine()["load_average_1m"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = None
        if not args.no_trl:
            import transformers

            transformers.utils.logging.set_verbosity_error()
            from rlhf.models import make_tiny_checkpoint

            checkpoint = make_tiny_checkpoint(workdir / "gpt2", solved_texts(), n_layer=4, n_embd=256, n_head=4, vocab_size=512, max_positions=256)
        for r in range(args.rounds):
            runs["rlhf_xtransformers"].append(run_rlhf(xt, args.steps, workdir))
            runs["rlhf_xtransformers_compiled"].append(run_rlhf(compiled, args.steps, workdir))
            if checkpoint is not None:
                runs["rlhf_hf_gpt2"].append(run_rlhf(ModelConfig(backend="hf", path=str(checkpoint)), args.steps, workdir))
                runs["trl"].append(run_trl(checkpoint, args.steps, workdir))
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    results = {name: summarize(rs, args.warmup) for name, rs in runs.items() if rs}
    result = {
        "benchmark": "GRPO training step (2 prompts x 4 samples, <= 32 new tokens): rlhf vs TRL GRPOTrainer",
        "command": " ".join(["python -m benchmarks.bench_grpo", *sys.argv[1:]]),
        "models": {
            "rlhf_xtransformers": {"dim": 256, "depth": 4, "heads": 4, "parameters": build_model(xt, 99).num_parameters()},
            "gpt2": {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab": 512},
        },
        "completions_per_step": COMPLETIONS_PER_STEP,
        "steps_per_run": args.steps,
        "warmup_steps_dropped": args.warmup,
        "rounds": args.rounds,
        "results": results,
        "machine": machine() | {"load_average_1m_at_start": start_load},
    }
    if "trl" in results:
        import trl

        result["machine"]["trl"] = trl.__version__
        trl_rate = results["trl"]["completions_per_s"]
        result["speedup_vs_trl_same_run"] = {k: v["completions_per_s"] / trl_rate for k, v in results.items() if k != "trl"}
    # the engineering notes' TRL figure at this size, measured on an idle machine
    result["speedup_vs_guide_trl_27_per_s"] = {k: v["completions_per_s"] / 27 for k, v in results.items() if k != "trl"}
    if args.quick:
        import json

        print(json.dumps(result, indent=2))
    else:
        write_result("grpo", result)


if __name__ == "__main__":
    main()
