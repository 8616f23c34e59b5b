"""Evaluate an exported embedding model on a query/gallery split (CMC, mAP, mINP, plots).

    python jobs/evaluate.py [--config FILE.yaml] [key=value ...]
    python jobs/evaluate.py model_dir=runs/demo/models/trained label=trained
    python jobs/evaluate.py model_dir=runs/demo/models/trained label=trained through_index=true index_candidates=100

Prints a table of every result in <run_dir>/summary.json and the open-set threshold (open_set.json);
the last line is the MLflow UI command.
"""

import sys

from reidscale.cli import run_job
from reidscale.evaluate.job import EvalJobConfig, evaluate_model

if __name__ == "__main__":
    sys.exit(run_job(EvalJobConfig, evaluate_model))
