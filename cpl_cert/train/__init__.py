"""Training CPL networks: the paper's recipe, evaluated every epoch, resumable, optionally distributed."""

from .loop import EpochStats, NonFiniteLoss, TrainOptions, TrainResult, log_path, train

__all__ = ["EpochStats", "NonFiniteLoss", "TrainOptions", "TrainResult", "log_path", "train"]
