"""`python -m rlhf COMMAND ...`

  run [overrides...]        compose a recipe with Hydra and run it (`-m` sweeps)
  run resume=DIR [key=value ...]   continue a run in DIR from its saved config
  report DIR [DIR ...]      a table of each stage's metrics, and a plot
  evaluate STAGE_DIR ...    held-out task score, pass@k and judge of finished stages (--prompts N, --samples K, --judge)
  generate ...              best-of-N sampling from a trained run
  export ...                write a trained policy in a portable format
  feedback serve|export     the human-feedback web page
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from pathlib import Path

from rlhf.errors import RLHFError

# command -> module with main(argv) -> int; each belongs to the feature that provides it
SUBCOMMANDS = {
    "report": "rlhf.report",
    "evaluate": "rlhf.evaluation",
    "generate": "rlhf.best_of_n",
    "export": "rlhf.export",
    "feedback": "rlhf.feedback.cli",
}


def _quiet_lightning() -> None:
    # Lightning's advice that does not apply to step-indexed, iterable data
    for pattern in (".*does not have many workers.*", ".*IterableDataset.*", ".*log_every_n_steps.*", ".*`max_epochs` was not set.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> "NoReturn":  # noqa: F821
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def interrupted(run_dir) -> "NoReturn":  # noqa: F821
    """Ctrl-C: the last line says how to continue (complete stages and the last checkpoint are kept)."""
    fail(f"interrupted; continue the run with: python -m rlhf run resume={run_dir}", code=130)


def run_with_hydra(overrides: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from rlhf.config import CONF_DIR, register_configs
    from rlhf.orchestrator import run_recipe

    register_configs()
    # Hydra reads sys.argv; Lightning's DDP launcher re-runs sys.argv in each child process
    sys.argv = [sys.argv[0], *overrides]

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _main(cfg) -> None:
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        if cfg.get("name") is None:
            cfg.name = f"{hc.runtime.choices.get('recipe', 'run')}-{run_dir.parent.name}-{run_dir.name}"
        try:
            run_recipe(cfg, run_dir)
        except RLHFError as err:
            fail(str(err))
        except KeyboardInterrupt:
            interrupted(run_dir)

    _main()


CONFIG_GROUPS = ("recipe", "model", "task", "trainer", "logger")  # `group=option` overrides


def compose(overrides: list[str]):
    """The run config `python -m rlhf run OVERRIDES` composes (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return hydra_compose(config_name="config", overrides=overrides)


def resume_run(run_dir: str, overrides: list[str]) -> None:
    """Continue the run in run_dir. Plain key=value overrides apply to its saved config; the
    original command's overrides (`recipe=full model=tiny ...`) are composed as that command
    composed them. Either way only environment settings (threads, logging) and the settings of
    stages not yet complete may differ from the run's: the orchestrator names any other changed
    key."""
    from omegaconf import OmegaConf

    from rlhf.orchestrator import load_run_config, run_recipe

    overrides = [o for o in overrides if not o.startswith("hydra.")]
    cfg = load_run_config(Path(run_dir))
    if any(o.split("=", 1)[0].lstrip("+~") in CONFIG_GROUPS for o in overrides):
        try:
            composed = compose(overrides)
        except Exception as err:  # Hydra names the override it could not apply
            fail(f"resume={run_dir}: {str(err).splitlines()[0]}")
        composed.name = composed.name if composed.get("name") is not None else cfg.get("name")
        cfg = composed
    else:
        for o in overrides:
            if "=" not in o or o[0] in "+~" or "@" in o.split("=", 1)[0]:
                fail(f"{o!r}: with resume=DIR only plain key=value overrides apply (stage slots and order are fixed by the run)")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        run_recipe(cfg, Path(run_dir), resuming=True)
    except KeyboardInterrupt:
        interrupted(run_dir)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0
    # a bare list of overrides means `run`: Lightning's DDP children are started that way
    command = argv.pop(0) if not ("=" in argv[0] or argv[0].startswith("-")) else "run"
    _quiet_lightning()
    try:
        if command == "run":
            resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
            if resume:
                resume_run(resume[-1], [a for a in argv if not a.startswith("resume=")])
            else:
                run_with_hydra(argv)
            return 0
        if command not in SUBCOMMANDS:
            fail(f"unknown command {command!r}; commands: run, {', '.join(SUBCOMMANDS)}")
        try:
            module = importlib.import_module(SUBCOMMANDS[command])
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("rlhf"):
                fail(f"command {command!r} is not available in this version")
            raise
        return int(module.main(argv) or 0)
    except RLHFError as err:
        fail(str(err))
