"""Training: the run's config, the loop, one optimizer step, data-parallel processes, EMA and checkpoints.

Imports point down only: ``distill`` (the distillation runs) uses ``loop``; ``loop`` uses ``step``, ``ema``,
``resolve``, ``checkpoint``, ``objective`` (what a step minimises: the denoising loss or a distillation's) and
``sample_grids``; ``step`` uses ``distributed``; names in configs become objects through ``torchdiffusion.names``.
"""

from .checkpoint import load_checkpoint, load_denoiser, save_checkpoint
from .config import TrainConfig
from .distill import distill
from .loop import TrainResult, train
from .objective import OBJECTIVES

__all__ = ["TrainConfig", "TrainResult", "train", "distill", "OBJECTIVES", "load_checkpoint", "load_denoiser"]
__all__ += ["save_checkpoint"]
