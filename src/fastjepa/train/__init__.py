"""Training: the trainer and its components (see ``trainer.py`` for how they fit together).

``python -m fastjepa.train ...`` is ``fastjepa train ...``."""
from .trainer import Trainer

__all__ = ["Trainer"]
