"""tlexp: transfer learning vs training from scratch, on your data, tracked with MLflow.

Importing the package is cheap: torch, MLflow and friends load only when a
command or function that needs them runs.
"""

__version__ = "0.1.0"
