"""Read tlexp runs back from the MLflow store, compare the strategies, and say what the numbers show.

This replaces the end of the seed notebook (its table, bar charts and "insights") with numbers read
from the tracking store only: nothing is re-trained. One module per step:

    read       the store -> one row per run (load_runs)         history    per-epoch metrics (load_history)
    aggregate  identities, repeats, per-run numbers, rows, the tuned choice
    stats      paired t-tests and intervals (scipy), data efficiency, crossover
    findings   the words                                          run        build_comparison, run_compare
    types      the data types the report and the charts draw (Comparison, Section, CompareResult)

Accuracies stay fractions in [0, 1] in every frame and CSV; they become percentages only on display.
"""

from tlexp.compare.aggregate import TABLE_METRICS, TUNED_KEYS, run_identity, run_stats, summarize
from tlexp.compare.history import PER_EPOCH_METRICS, load_history
from tlexp.compare.read import load_runs, select_training_runs
from tlexp.compare.run import build_comparison, run_compare
from tlexp.compare.types import CompareError, CompareResult, Comparison, Section

__all__ = ["CompareError", "Comparison", "CompareResult", "Section", "load_runs", "load_history", "run_stats",
           "summarize", "build_comparison", "run_compare", "run_identity", "select_training_runs",
           "PER_EPOCH_METRICS", "TABLE_METRICS", "TUNED_KEYS"]
