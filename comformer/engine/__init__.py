"""Training and running scenarios: detectron2's trainer for comformer models (``trainer``), the
configuration and trainer of one scenario step (``step_config``, ``step_trainer``), the scenario
runner (``runner``), results files (``results``) and prediction pictures (``visualize``)."""

from .results import load_results, plot_results, record_step, results_table
from .runner import evaluate_step, run_scenario
from .step_config import step_config, step_dir, step_iterations, step_splits
from .step_trainer import StepTrainer
from .trainer import Trainer, build_optimizer, setup_cfg

__all__ = [
    "Trainer",
    "build_optimizer",
    "setup_cfg",
    "StepTrainer",
    "step_config",
    "step_dir",
    "step_iterations",
    "step_splits",
    "run_scenario",
    "evaluate_step",
    "load_results",
    "plot_results",
    "record_step",
    "results_table",
]
