"""The pre-training job: ``python -m train.pretrain`` (or ``looplm-pretrain``), under torchrun.

    torchrun --nproc_per_node 2 -m train.pretrain model=tiny data=embedded deepspeed=zero2 \
        run_dir=runs/tiny train.max_steps=300

Re-running the same command on the same ``run_dir`` resumes from its latest complete
checkpoint, exactly: the per-step losses of a resumed run equal the uninterrupted run's. The
work is `train.trainer`'s; this module is the Hydra app.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from train.trainer import CONFIG_DIR, Trainer, run_job


@hydra.main(config_path=CONFIG_DIR, config_name="pretrain", version_base=None)
def main(raw: DictConfig) -> None:
    run_job(Trainer, raw)


if __name__ == "__main__":
    main()
