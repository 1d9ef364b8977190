"""Checkpoints that restore a run exactly, written atomically, read without running code:
format.py (what a checkpoint holds), saving.py (writing one, rotation), resuming.py (reading
one back, checked, with fallback). The names other modules use are here."""

from dist_resnet.checkpoint.format import (FORMAT, MAX_PART_BYTES, NAME, CheckpointError, CheckpointWriteError,
                                         IncompatibleCheckpoint, Meta, checkpoint_dir, complete_checkpoints,
                                         tensor_bytes)
from dist_resnet.checkpoint.resuming import read_meta, resume
from dist_resnet.checkpoint.saving import rotate, save

__all__ = ["FORMAT", "MAX_PART_BYTES", "NAME", "CheckpointError", "CheckpointWriteError", "IncompatibleCheckpoint",
           "Meta", "checkpoint_dir", "complete_checkpoints", "read_meta", "resume", "rotate", "save", "tensor_bytes"]
