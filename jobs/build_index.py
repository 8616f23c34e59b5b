"""Embed a gallery split with an exported model (or take precomputed vectors) and build a sharded FAISS index.

    python jobs/build_index.py [--config FILE.yaml] [key=value ...]
    python jobs/build_index.py model_dir=runs/demo/models/trained num_shards=4 factory=HNSW32
    python jobs/build_index.py embeddings=gallery.npy out_dir=runs/scale/index/g1m memory_budget_gb=4
"""

import sys

from reidscale.cli import run_job
from reidscale.index.job import IndexJobConfig, build_gallery_index

if __name__ == "__main__":
    sys.exit(run_job(IndexJobConfig, build_gallery_index))
