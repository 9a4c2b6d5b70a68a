"""TRL's DPOTrainer, timed per step: the peer both DPO benchmarks run in the same run as ours.

Used by bench_hf_dpo (our HF backend vs TRL on one GPT-2 checkpoint) and bench_dpo (our
x-transformers model vs TRL on a GPT-2 of the same shape). Needs `pip install trl`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def run_trl_dpo(
    checkpoint: Path,
    rows: list[dict],
    steps: int,
    workdir: Path,
    *,
    batch: int,
    lr: float,
    max_length: int,
    lengths: tuple[int, int],
    bf16: bool,
    gradient_checkpointing: bool,
    precompute: bool = False,
    attention: str | None = None,
) -> dict:
    """Train `steps` optimizer steps of TRL's DPOTrainer on `rows` ({prompt, chosen, rejected} texts).

    `lengths` = (prompt tokens, response tokens with TRL's appended EOS) that the first row must
    tokenise to, so both sides of a comparison see the same token counts. With `precompute` the
    reference log-probs are computed once in DPOTrainer's constructor (TRL 1.16) and no reference
    model is kept; otherwise a reference model runs on every batch.

    Returns per-step wall and CPU seconds (step begin to step end, data fetching excluded), the
    wall-clock time at each step's end (so callers can time step end to step end, data included),
    end-to-end seconds from train start to the last step, and the reference precompute's seconds.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []
            self.cpu: list[float] = []
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.end = time.perf_counter()
            self.ends.append(self.end)
            self.steps.append(self.end - self._t)
            self.cpu.append(time.process_time() - self._c)

    class TimedDPOTrainer(DPOTrainer):
        precompute_s = 0.0

        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                TimedDPOTrainer.precompute_s += time.perf_counter() - start

    tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    tok.pad_token = tok.eos_token
    kwargs = {"attn_implementation": attention} if attention else {}
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True, **kwargs)
    ref = None if precompute else AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True, **kwargs)
    args = DPOConfig(
        output_dir=str(Path(tempfile.mkdtemp(dir=workdir))), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10**6, save_strategy="no",
        report_to="none", use_cpu=True, max_length=max_length, beta=0.1, disable_dropout=True, seed=0,
        dataloader_num_workers=0, max_grad_norm=1.0, bf16=bf16, gradient_checkpointing=gradient_checkpointing,
        precompute_ref_log_probs=precompute,
    )
    timer = Timer()
    trainer = TimedDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer])
    first = trainer.train_dataset[0]
    assert (len(first["prompt_ids"]), len(first["chosen_ids"]), len(first["rejected_ids"])) == (lengths[0], lengths[1], lengths[1]), first
    trainer.train()
    assert len(timer.steps) == steps
    return {
        "steps": timer.steps, "cpu": timer.cpu, "step_ends": timer.ends, "end_to_end_s": timer.end - timer.start,
        "precompute_s": TimedDPOTrainer.precompute_s, "parameters": model.num_parameters(),
        # GPT-2's learned positions: parameters that do no matmul
        "position_parameters": model.transformer.wpe.weight.numel() if hasattr(getattr(model, "transformer", None), "wpe") else 0,
    }
