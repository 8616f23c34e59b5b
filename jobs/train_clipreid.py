"""Train a ReID model on Ray Train + DeepSpeed; export the embedding model; log to MLflow.

    python jobs/train_clipreid.py [--config FILE.yaml] [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train_clipreid.py run_dir=$PWD/runs/demo
"""

import sys

from reidscale.cli import run_job
from reidscale.train.config import TrainJobConfig
from reidscale.train.trainer import run_training

if __name__ == "__main__":
    sys.exit(run_job(TrainJobConfig, run_training))
