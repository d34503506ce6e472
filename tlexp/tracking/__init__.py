"""The only package that writes to MLflow: run lifecycle, params, metrics, artifacts, the model.

A run always ends in a definite state: FINISHED, FAILED (error message as the
``tlexp.error`` tag, traceback as an artifact) or KILLED (Ctrl-C / SIGTERM),
and on FAILED/KILLED the last completed epoch's checkpoint is saved so that
``tlexp train --resume RUN_ID`` can continue the same run.

Under ``mlflow run`` the entry point logs into the run MLflow created
(``MLFLOW_RUN_ID``) instead of starting a second one; its experiment is the one
``mlflow run`` chose, so every run also carries the ``tlexp.experiment`` tag
that ``tlexp compare`` searches for.
"""

from .comparison import log_comparison_run
from .logger import FitLogger, NullLogger
from .runs import RunLogger, load_checkpoint, sweep_run, training_run
from .signals import Interrupted, raise_pending, sigterm_as_interrupt, signals_deferred
from .store import (CHECKPOINT_ARTIFACT, TAG_CELL, TAG_DIVERGED_EPOCH, TAG_ERROR, TAG_EXPERIMENT, TAG_KIND,
                    TAG_STALE_CHECKPOINT, TAG_SWEEP, TrackingError, check_store, experiment_id, find_run, quick_http,
                    resumable_run, retry_locked, run_exists, search_tagged, sqlite_path, store_exists, sweep_children,
                    tag_equals, tagged, tracking_uri, write_problem)

# The names imported above are this package's public face.
