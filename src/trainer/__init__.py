"""The generic training engine (see README.md): config, optimizer and schedules, model
preparation (checkpointing, compile, FSDP2 / DDP), sharded checkpoints, and the Trainer loop."""

from .checkpoint import CheckpointError, CheckpointManager, export_hf, list_checkpoints
from .config import (
    CheckpointConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    TrainerConfig,
    load_config,
)
from .optimizer import LRSchedule, build_optimizer, param_groups
from .parallelize import prepare_model
from .trainer import Trainer

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "LRSchedule",
    "LoggingConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TrainConfig",
    "Trainer",
    "TrainerConfig",
    "build_optimizer",
    "export_hf",
    "list_checkpoints",
    "load_config",
    "param_groups",
    "prepare_model",
]
