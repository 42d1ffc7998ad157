"""Start a training job on this machine, on the hosts of a hostfile, or as a Slurm job.

    python -m launch [LAUNCHER OVERRIDES...] [-- JOB OVERRIDES...]

Everything before `--` configures the launcher (a Hydra app composing `configs/launch.yaml`);
everything after it is handed verbatim, shell-quoted, to the job (`launch.module`, by default
`train.pretrain`). Job overrides may also live in the config as the list `launch.args`; the
ones after `--` come after them, so they win. `launch.dry_run=true` prints the command (for
Slurm, the batch script) and starts nothing.

    python -m launch -- model=tiny run_dir=runs/tiny
    python -m launch launcher.nproc_per_node=2 launch.dry_run=true -- model=tiny run_dir=runs/t
    python -m launch launcher=hostfile launcher.hostfile=/job/hostfile -- run_dir=/ckpt/run1
    python -m launch launcher=slurm launcher.nodes=4 launcher.partition=gpu \\
        -- experiment=ouro_1.4b deepspeed=zero3 run_dir=/scratch/run1
    python -m launch launcher=slurm launch.dry_run=true -- run_dir=/x > job.sbatch
    python -m launch launch.module=train.sft -- experiment=tiny_thinking_sft init_from=runs/tiny \\
        run_dir=runs/sft

Launchers (`launcher=`):
  local     torchrun --nproc_per_node N --master_port P -m MODULE ARGS
  hostfile  deepspeed --hostfile H --master_addr A --master_port P --num_nodes K --num_gpus G
            --no_local_rank --module MODULE ARGS
  slurm     an sbatch script (written to `launcher.log_dir`, then submitted) that runs one
            torchrun per node with srun, meeting in a c10d rendezvous on the first node
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from launch.app import launch, split_job_args
from launch.config import to_launch_config

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def main() -> None:
    """Entry point of `python -m launch`."""
    launcher_args, job_args = split_job_args(sys.argv[1:])
    sys.argv = [sys.argv[0], *launcher_args]

    @hydra.main(config_path=CONFIG_DIR, config_name="launch", version_base=None)
    def run(raw: DictConfig) -> None:
        try:
            status = launch(to_launch_config(raw), job_args)
        except ValueError as error:
            sys.exit(f"error: {error}")
        sys.exit(status)

    run()


if __name__ == "__main__":
    main()
