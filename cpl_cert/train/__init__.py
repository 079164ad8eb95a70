"""Training CPL networks: the paper's recipe, evaluated every epoch, resumable, optionally distributed.

``options`` (what a run is asked), ``setup`` (data, model, optimiser, resume, DDP/compile), ``epoch``
(the training steps), ``evaluate`` (certify a frozen copy), ``save`` (checkpoint and log), ``loop``
(``train`` itself); ``events`` are what a run reports; ``losses``, ``schedule`` and ``augment`` are the recipe.
"""

from .epoch import NonFiniteLoss
from .events import EpochStats, TrainEvent
from .loop import TrainResult, train
from .options import TrainOptions, default_options
from .save import log_path

__all__ = ["EpochStats", "NonFiniteLoss", "TrainEvent", "TrainOptions", "TrainResult", "default_options", "log_path", "train"]
