"""Serve a gallery index over HTTP (Ray Serve): search, enrol, delete, health, info.

    python jobs/serve.py index_dir=runs/demo/index/trained model_dir=runs/demo/models/trained
    python jobs/serve.py --config configs/serve/local.yaml port=8001 embedder.replicas=2
    REIDSCALE_SERVE_TOKEN=secret python jobs/serve.py index_dir=...   # bearer token required

Binds 127.0.0.1 unless host= says otherwise; stops cleanly on Ctrl-C / SIGTERM.
"""

import logging
import sys

from reidscale.cli import run_job
from reidscale.serve.app import run_service
from reidscale.serve.config import ServeConfig

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(run_job(ServeConfig, run_service))
