import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
OURO_TINY = os.path.join(ASSETS, "ouro-tiny")


DISTRIBUTED_TESTS = os.path.join(os.path.dirname(__file__), "distributed")


def pytest_itemcollected(item):
    """The folder is the tier: every test under tests/distributed is marked ``distributed``
    (it spawns gloo ranks), so ``-m "not distributed"`` is the unit tier, whatever a file says."""
    if str(item.path).startswith(DISTRIBUTED_TESTS + os.sep):
        item.add_marker(pytest.mark.distributed)


def tier(item) -> int:
    """The order the suite runs in, so that a red result comes early: the unit tier (minutes),
    the distributed smoke subset, the other distributed tests, the GPU tests."""
    if "gpu" in item.keywords:
        return 3
    if "distributed" not in item.keywords:
        return 0
    return 1 if "smoke" in item.keywords else 2


def pytest_collection_modifyitems(config, items):
    items.sort(key=tier)  # stable: each tier keeps the files' order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
