"""`python -m rlhf report RUN_DIR [RUN_DIR ...] [--plot FILE.png | --no-plot] [--all]`

Prints each stage's metrics (from `<run>/stages/<NN>_<slot>/metrics.json`, in run order) as
a table; several runs are shown side by side, one line per run under each stage. The table's
columns are the main metrics present (task score, exact match, pass@k, best-of-k, sample
exact rate, judge agreement, the judge's mean score of exact and of inexact answers, judge
parse failures, length, KL, pairs, and each stage kind's main training metrics: loss, the
preference reward margin and accuracy, the reward model's pair accuracy, the RL reward and
verifier score); `--all` shows every metric (per family, calibration buckets, ...). Runs are
named by the settings that differ between them (a sweep's `dpo.beta=0.5`), else by their dir.
Then plots the main metrics across stages (greedy task score with pass@k dashed beside it,
judge agreement, response length, KL, reward margin, pair accuracy, RL reward), one line per
run, to `--plot`
(default `<first run>/report.png`); for RL stages that logged both, a last panel draws the
reward they optimised beside the verifier's score, rollout by rollout (a learned reward
rising while the verifier's score does not is reward hacking).

A stage without its own judge agreement (SFT, say) shows the value the NEXT stage measured
on its starting weights (`start/judge_agreement`), which are this stage's final weights;
such values are marked with `*`. A stage still running (no COMPLETE marker) is listed
without metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rlhf import files
from rlhf.errors import RLHFError

# (metrics.json key, column title) of the table's default columns; pass@k and best-of-k
# columns are added for whatever k the runs sampled (HEADROOM)
MAIN = [
    ("eval/task_score", "task_score"),
    ("eval/exact_match", "exact"),
    ("eval/sample_exact", "sample_exact"),
    ("eval/judge_agreement", "judge_agree"),
    ("eval/judge_score_exact", "judge_exact"),
    ("eval/judge_score_inexact", "judge_inexact"),
    ("eval/judge_parse_failure_rate", "judge_fail"),
    ("eval/response_length", "length"),
    ("eval/kl", "kl"),
    ("pairs_total", "pairs"),
    # each stage kind's main training metrics: a sweep's settings move these first
    ("train/loss", "train_loss"),
    ("train/rewards/margin", "margin"),
    ("train/rewards/accuracy", "pref_acc"),
    ("eval/pair_accuracy", "rm_pair_acc"),
    ("rollout/reward_mean", "rl_reward"),
    ("rollout/verifier_score", "rl_verifier"),
]
# overall headroom keys (not per family): column titles "pass@8", "best_of_8"
HEADROOM = re.compile(r"eval/(pass@\d+|best_of_\d+)")
# (key, title) of the plot's panels; the task score panel also draws pass@k, dashed
PLOTTED = [
    ("eval/task_score", "task score (held-out, greedy)"),
    ("eval/judge_agreement", "judge agreement (pairwise)"),
    ("eval/response_length", "response length (chars)"),
    ("eval/kl", "KL to reference"),
    ("train/rewards/margin", "preference reward margin (train)"),
    ("eval/pair_accuracy", "reward model pair accuracy"),
    ("rollout/reward_mean", "RL reward (last rollouts)"),
]


@dataclass
class Stage:
    slot: str
    kind: str
    complete: bool
    metrics: dict[str, float] = field(default_factory=dict)
    borrowed: set[str] = field(default_factory=set)  # keys taken from the next stage's start/ values
    # (rollout, reward the stage optimised, verifier score) per rollout of an RL stage that
    # logged both (rollout_metrics.jsonl): the reward-hacking diagnostic
    reward_vs_verifier: list[tuple[int, float, float]] = field(default_factory=list)


@dataclass
class Run:
    name: str
    path: Path
    stages: list[Stage]
    config: dict = field(default_factory=dict)  # the run's config.yaml as {dotted key: value}


def read_reward_vs_verifier(stage_dir: Path) -> list[tuple[int, float, float]]:
    """(rollout, rollout/reward_mean, rollout/verifier_score) of each rollout in the stage's
    rollout_metrics.jsonl that has both (PPO, GRPO); [] when there is none. A learned reward
    that climbs while the verifier's score stays flat or falls is reward hacking."""
    path = stage_dir / "rollout_metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["rollout"]), float(r["rollout/reward_mean"]), float(r["rollout/verifier_score"])) for r in rows if "rollout/reward_mean" in r and "rollout/verifier_score" in r]


def read_run(path: str | Path) -> Run:
    path = Path(path)
    stages_dir = path / "stages"
    if not stages_dir.is_dir():
        raise RLHFError(f"{path}: not a run dir (no stages/ folder)")
    stages = []
    for stage_dir in sorted(p for p in stages_dir.iterdir() if p.is_dir()):
        index, _, slot = stage_dir.name.partition("_")
        if not index.isdigit():
            continue
        kind = "?"
        if (stage_dir / "config.yaml").exists():
            from omegaconf import OmegaConf

            kind = str(OmegaConf.load(stage_dir / "config.yaml").get("kind", "?"))
        complete = files.is_complete(stage_dir)
        metrics = files.read_json(stage_dir / "metrics.json") if complete and (stage_dir / "metrics.json").exists() else {}
        stages.append(Stage(slot, kind, complete, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, reward_vs_verifier=read_reward_vs_verifier(stage_dir)))
    if not stages:
        raise RLHFError(f"{path}: the run has no stages yet")
    # the next stage's start/ metrics describe this stage's final weights
    # (only for a stage that measured none of them itself)
    for stage, following in zip(stages, stages[1:]):
        start = {"eval/" + k[len("start/") :]: v for k, v in following.metrics.items() if k.startswith("start/")}
        if not start.keys() & stage.metrics.keys():
            stage.metrics.update(start)
            stage.borrowed |= start.keys()
    config = {}
    if (path / "config.yaml").exists():
        from omegaconf import OmegaConf

        from rlhf.config import flat_config

        config = flat_config(OmegaConf.load(path / "config.yaml"))
    return Run(path.name, path, stages, config)


def swept_keys(runs: list[Run]) -> list[str]:
    """The settings whose values differ between the runs (a sweep's swept keys), environment
    settings (threads, logging, the run's name) aside."""
    from rlhf.config import ENVIRONMENT_KEYS

    keys = sorted({k for run in runs for k in run.config})
    return [k for k in keys if not k.startswith(ENVIRONMENT_KEYS) and len({repr(run.config.get(k)) for run in runs}) > 1]


def _names(runs: list[Run]) -> list[str]:
    """Short labels: what differs between the runs' configs (`dpo.beta=0.5` for a sweep over
    stages.dpo.beta; at most 3 settings), else the dir name, or the path when two runs share one."""
    swept = swept_keys(runs) if len(runs) > 1 else []
    if swept:
        shown = swept[:3]
        labels = [", ".join(f"{k.removeprefix('stages.')}={run.config.get(k)}" for k in shown) + (", ..." if len(swept) > 3 else "") for run in runs]
        if len(set(labels)) == len(labels):
            return labels
    names = [r.name for r in runs]
    return [str(r.path) if names.count(r.name) > 1 else r.name for r in runs]


def _cell(stage: Stage, key: str) -> str:
    value = stage.metrics.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.0f}" if key.endswith("_total") else f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return text + ("*" if key in stage.borrowed else "")


def format_table(runs: list[Run], all_keys: bool = False) -> str:
    if all_keys:
        keys = sorted({k for run in runs for s in run.stages for k in s.metrics})
        columns = [(k, k) for k in keys]
    else:
        present = {k for run in runs for s in run.stages for k in s.metrics}
        columns = [(k, title) for k, title in MAIN if k in present]
        # headroom columns right after exact match, pass@k before best-of-k, smaller k first
        headroom = sorted((k for k in present if HEADROOM.fullmatch(k)), key=lambda k: (k.startswith("eval/best"), int(re.sub(r"\D", "", k))))
        at = next((i + 1 for i, (k, _) in enumerate(columns) if k == "eval/exact_match"), len(columns))
        columns[at:at] = [(k, HEADROOM.fullmatch(k).group(1)) for k in headroom]
    names = _names(runs)
    slots: list[str] = []
    for run in runs:
        slots += [s.slot for s in run.stages if s.slot not in slots]
    header = ["stage", "kind"] + (["run"] if len(runs) > 1 else []) + [title for _, title in columns]
    lines = []
    for slot in slots:
        for name, run in zip(names, runs):
            stage = next((s for s in run.stages if s.slot == slot), None)
            if stage is None:
                continue
            cells = [slot, stage.kind] + ([name] if len(runs) > 1 else [])
            if not stage.complete:
                cells += ["(not complete)"] + [""] * (len(columns) - 1) if columns else ["(not complete)"]
            else:
                cells += [_cell(stage, k) for k, _ in columns]
            lines.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *lines] if i < len(row)) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    previous_slot = None
    for cells in lines:
        if len(runs) > 1 and cells[0] == previous_slot:
            cells = ["", ""] + cells[2:]
        else:
            previous_slot = cells[0]
        out.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
    if any(s.borrowed for run in runs for s in run.stages):
        out.append("* measured by the next stage on its starting weights (this stage's final weights)")
    return "\n".join(out)


def plot(runs: list[Run], path: Path) -> Optional[Path]:
    """The main metrics across stages, one line per run; None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("note: no plot (matplotlib is not installed: pip install 'rlhf[report]')")
        return None
    slots: list[str] = []
    for run in runs:
        slots += [s.slot for s in run.stages if s.slot not in slots]
    panels = [(k, t) for k, t in PLOTTED if any(k in s.metrics for run in runs for s in run.stages)] or PLOTTED[:1]
    hacking = [(name, s) for name, run in zip(_names(runs), runs) for s in run.stages if s.reward_vs_verifier]
    n_axes = len(panels) + bool(hacking)
    fig, axes = plt.subplots(1, n_axes, figsize=(4.2 * n_axes, 3.6), squeeze=False)
    passes = sorted({k for run in runs for s in run.stages for k in s.metrics if k.startswith("eval/pass@") and HEADROOM.fullmatch(k)})
    for ax, (key, title) in zip(axes[0], panels):
        # greedy task score beside what k samples reach (same colour per run, pass@k dashed)
        overlays = passes if key == "eval/task_score" else []
        for name, run in zip(_names(runs), runs):
            lines = [(key, "-", "o", name)] + [(k, "--", "^", f"{name} {k[len('eval/'):]}") for k in overlays]
            color = None
            for k, style, marker, label in lines:
                points = [(slots.index(s.slot), s.metrics[k]) for s in run.stages if k in s.metrics]
                if points:
                    (line,) = ax.plot([x for x, _ in points], [y for _, y in points], style, marker=marker, label=label, color=color)
                    color = line.get_color()
        if overlays:
            title = f"{title} vs {', '.join(k[len('eval/'):] for k in overlays)} (dashed)"
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(slots)))
        ax.set_xticklabels(slots, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    if hacking:  # over training: the reward the stage optimised (solid, left axis: a learned
        # reward has its own scale) beside the verifier's score (dashed, right axis)
        ax = axes[0][-1]
        right = ax.twinx()
        for name, stage in hacking:
            steps, reward, verifier = zip(*stage.reward_vs_verifier)
            (line,) = ax.plot(steps, reward, "-", label=f"{name} {stage.slot}")
            right.plot(steps, verifier, "--", color=line.get_color())
        ax.set_title("reward (solid, left) vs verifier (dashed, right)", fontsize=10)
        ax.set_xlabel("rollout", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if len(runs) > 1 or passes:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf report", description="Compare the stages of one or more runs.")
    parser.add_argument("runs", nargs="+", help="run dirs (outputs/runs/...)")
    parser.add_argument("--plot", type=Path, default=None, help="where to write the plot (default: <first run>/report.png)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.add_argument("--all", action="store_true", help="every metric, not just the main ones")
    args = parser.parse_args(argv)
    runs = [read_run(p) for p in args.runs]
    print(format_table(runs, all_keys=args.all))
    if not args.no_plot:
        written = plot(runs, args.plot or runs[0].path / "report.png")
        if written is not None:
            print(f"plot: {written}")
    return 0
