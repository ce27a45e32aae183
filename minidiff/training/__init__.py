"""Training: the steps a loop is written from (``steps``), the full loop (``loop``), checkpoints and the command line."""
from minidiff.training.loop import TrainConfig, train
from minidiff.training.steps import EMA, make_optimizer, parameter_groups, train_step, validation_loss

__all__ = ["EMA", "make_optimizer", "parameter_groups", "train_step", "validation_loss", "TrainConfig", "train"]
