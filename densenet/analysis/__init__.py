"""The paper's analyses: its reported numbers, feature-reuse maps (Figure 5), tables of runs beside
the paper's (Tables 2 and 3) and learning-curve plots (Figure 4)."""
from .metrics import (
    METRICS_INSTALL,
    class_metrics,
    confusion_matrix,
    format_class_table,
    format_confusion,
    metric_columns,
    read_confusion_csv,
    sklearn_metrics,
    top5_applies,
    write_confusion_csv,
)
from .paper import PAPER_EPOCHS, TABLE2, TABLE2_DATASETS, TABLE3
from .plots import plot_confusion, plot_curves, plot_efficiency
from .reuse import BlockReuse, feature_reuse, plot_reuse, write_reuse_csv
from .tables import Run, RunError, load_run, markdown_table, render_csv, render_markdown, table_records

__all__ = ["PAPER_EPOCHS", "TABLE2", "TABLE2_DATASETS", "TABLE3", "plot_confusion", "plot_curves", "plot_efficiency",
           "BlockReuse", "feature_reuse", "plot_reuse", "write_reuse_csv", "Run", "RunError", "load_run", "markdown_table",
           "render_csv", "render_markdown", "table_records", "METRICS_INSTALL", "class_metrics", "confusion_matrix",
           "format_class_table", "format_confusion", "metric_columns", "read_confusion_csv", "sklearn_metrics",
           "top5_applies", "write_confusion_csv"]
