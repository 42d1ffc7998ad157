"""The job's settings checked before anything is written or submitted.

A launch composes the job's own config from its overrides, as the job will, and runs the
job's checks on it (unknown keys, wrong types, impossible values, missing files), for the
number of ranks the launcher will start: a typo found here costs a second, not a wait in a
queue. `launch.validate=false` skips this, e.g. for data that only the compute nodes see.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")

JOBS: dict[str, tuple[str, str]] = {
    "train.pretrain": ("pretrain", "train.config:config_problems"),
    "train.sft": ("sft", "train.sft:sft_problems"),
    "train.gate_tuning": ("gate_tuning", "train.gate_tuning:gate_tuning_problems"),
}
"""Job module -> (its primary config, its checks as `module:function`)."""


def _checks(name: str) -> Callable:
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def job_problems(module: str, job_args: list[str], world_size: int) -> list[str] | None:
    """Every problem of the job `module` started with `job_args` on `world_size` ranks; None
    for a module this launcher cannot check. Inside the launcher's Hydra app (whose config
    directory the jobs share) or outside any."""
    if module not in JOBS:
        return None

    config_name, checks = JOBS[module]
    # What the job's imports print (DeepSpeed's accelerator notice) must not mix into a dry
    # run's output, which is the command or the batch script.
    with contextlib.redirect_stdout(sys.stderr):
        importlib.import_module(module)  # registers the job's schemas
        return _composed_problems(config_name, checks, job_args, world_size)


def _composed_problems(
    config_name: str, checks: str, job_args: list[str], world_size: int
) -> list[str]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        if GlobalHydra.instance().is_initialized():  # inside the launcher's app
            composed = compose(config_name=config_name, overrides=list(job_args))
        else:
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
                composed = compose(config_name=config_name, overrides=list(job_args))
        cfg = OmegaConf.to_object(composed)
    except Exception as error:
        return [f"the job's overrides do not compose: {error}"]
    return _checks(checks)(cfg, world_size)
