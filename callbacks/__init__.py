"""Lightning callbacks of refine-pl."""

from callbacks.checkpoint import RunCheckpoint
from callbacks.deployment import DeploymentFiles
from callbacks.export import ExportDefendedClassifier
from callbacks.image_grid import TransformImageGrid
from callbacks.predictions import PredictionCSV
from callbacks.report import DefenseReport, format_report_table
from callbacks.stopping import LabelFreeStopping

__all__ = [
    "DefenseReport",
    "DeploymentFiles",
    "ExportDefendedClassifier",
    "LabelFreeStopping",
    "PredictionCSV",
    "RunCheckpoint",
    "TransformImageGrid",
    "format_report_table",
]
