from .trainer import Trainer, build_optimizer, setup_cfg

__all__ = ["Trainer", "build_optimizer", "setup_cfg"]
