"""Lightning callbacks that measure and control entropy in any LightningModule, and the compute budget of GRPO
fine-tuning runs, and the learning curve of RL agents."""

from entreg.callbacks.compute_budget import ComputeBudget
from entreg.callbacks.entropy_controller import EntropyController
from entreg.callbacks.entropy_monitor import EntropyMonitor
from entreg.callbacks.interrupt_checkpoint import InterruptCheckpoint, TrainingInterrupted
from entreg.callbacks.learning_curve import LearningCurve, fit_learning_curve
from entreg.callbacks.progress_bar import ProgressBar
from entreg.callbacks.test_time_adaptation import TestTimeAdaptation

__all__ = [
    "ComputeBudget",
    "EntropyController",
    "EntropyMonitor",
    "InterruptCheckpoint",
    "LearningCurve",
    "ProgressBar",
    "TestTimeAdaptation",
    "TrainingInterrupted",
    "fit_learning_curve",
]
