"""Stage kinds. Each module here is one stage: `Config` (its schema) and `run(ctx)`.

A module is a stage kind if it defines KIND, Config and run; no registry to edit.
Stages do not import each other; shared pieces live in rlhf/ (logprobs, sampling,
losses, data, training, checkpoint).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from types import ModuleType


@lru_cache(maxsize=1)
def stage_kinds() -> dict[str, ModuleType]:
    kinds = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if all(hasattr(module, a) for a in ("KIND", "Config", "run")):
            kinds[module.KIND] = module
    return kinds
