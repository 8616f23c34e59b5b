"""Embed a gallery split with an exported model and build a sharded FAISS index.

    python jobs/build_index.py [--config FILE.yaml] [key=value ...]
    python jobs/build_index.py model_dir=runs/demo/models/trained num_shards=4 factory=HNSW32
"""

import sys

from reidscale.cli import run_job
from reidscale.index.job import IndexJobConfig, build_gallery_index

if __name__ == "__main__":
    sys.exit(run_job(IndexJobConfig, build_gallery_index))
