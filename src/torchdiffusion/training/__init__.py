"""Training: the run's config, the loop, one optimizer step, data-parallel processes, EMA and checkpoints.

Imports point down only: ``loop`` uses ``step``, ``ema``, ``resolve``, ``checkpoint`` and ``sample_grids``;
``step`` uses ``distributed``; names in configs become objects through ``torchdiffusion.names``.
"""

from .checkpoint import load_checkpoint, load_denoiser, save_checkpoint
from .config import TrainConfig
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train", "load_checkpoint", "load_denoiser", "save_checkpoint"]
