"""Turns data sources into packed, mixed, resumable token batches.

Public entry points: `DataConfig` / `SourceConfig` (the `data` config group),
`validate_data_config`, and `build_data_loader`.
"""

from data_pipelines.config import DataConfig, SourceConfig, validate_data_config
from data_pipelines.loader import PackedDataLoader, build_data_loader

__all__ = [
    "DataConfig",
    "PackedDataLoader",
    "SourceConfig",
    "build_data_loader",
    "validate_data_config",
]
