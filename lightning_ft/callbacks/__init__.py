"""Lightning callbacks of lightning_ft: each file one purpose."""

from lightning_ft.callbacks.export import SaveHFModel
from lightning_ft.callbacks.forgetting import ForgettingCheck
from lightning_ft.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from lightning_ft.callbacks.task_eval import TaskEval
from lightning_ft.callbacks.validate_at_start import ValidateAtStart

__all__ = ["ForgettingCheck", "NonFiniteGuard", "NonFiniteTrainingError", "SaveHFModel", "TaskEval", "ValidateAtStart"]
