"""Write a dataset as Parquet shards + manifest.json.

    python jobs/prepare_data.py [--config FILE.yaml] [key=value ...]
    python jobs/prepare_data.py synthetic.num_identities=1000 out_dir=/data/synth
    python jobs/prepare_data.py --config configs/datasets/market1501.yaml root=/data/Market-1501-v15.09.15 out_dir=/data/market
    python jobs/prepare_data.py --config configs/datasets/synthetic_1m.yaml out_dir=/data/synthetic_1m

Sources: synthetic, market1501, dukemtmc, msmt17, veri776, folder (configs/datasets/*.yaml).
Bad image files are skipped and counted (log + manifest ``skipped``); past
``max_error_rate`` the job exits 1 naming the rate and example files.
"""

import logging
import sys

from reidscale.cli import run_job
from reidscale.data.prepare import PrepareJobConfig, prepare

if __name__ == "__main__":
    # the library logs what it did (listing, per-split counts, skips); this job shows it on stderr
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sys.exit(run_job(PrepareJobConfig, prepare))
