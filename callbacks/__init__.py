"""Lightning callbacks of refine-pl."""

from callbacks.export import ExportDefendedClassifier
from callbacks.image_grid import TransformImageGrid
from callbacks.report import DefenseReport, format_report_table

__all__ = ["DefenseReport", "ExportDefendedClassifier", "TransformImageGrid", "format_report_table"]
