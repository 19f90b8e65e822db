"""Lightning callbacks of refine-pl."""

from callbacks.image_grid import TransformImageGrid
from callbacks.report import DefenseReport, format_report_table

__all__ = ["DefenseReport", "TransformImageGrid", "format_report_table"]
