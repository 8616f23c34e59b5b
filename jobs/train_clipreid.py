"""Train a ReID model on Ray Train + DeepSpeed; export the embedding model; log to MLflow.

Trains either recipe: recipe=baseline (the default: BoT, CE + triplet on a BNNeck) or
recipe=clipreid (CLIP-ReID's two stages). Re-running the same command (same run_dir and
run_name) continues from the newest complete checkpoint; a finished run is refused (give
run_name=NEW, or train.epochs=N to train it further).

    python jobs/train_clipreid.py --config configs/demo/train.yaml
    python jobs/train_clipreid.py --config configs/demo/train.yaml recipe=clipreid clipreid.stage1_epochs=10
    python jobs/train_clipreid.py train.resume_from=runs/demo/ray_results/train/checkpoint_... run_name=again

    python jobs/train_clipreid.py [--config FILE.yaml] [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train_clipreid.py run_dir=$PWD/runs/demo
"""

import sys

from reidscale.cli import run_job
from reidscale.train.config import TrainJobConfig
from reidscale.train.job import run_training

if __name__ == "__main__":
    sys.exit(run_job(TrainJobConfig, run_training))
