"""Write a dataset as Parquet shards + manifest.json.

    python jobs/prepare_data.py [--config FILE.yaml] [key=value ...]
    python jobs/prepare_data.py synthetic.num_identities=1000 out_dir=/data/synth
"""

import sys

from reidscale.cli import run_job
from reidscale.data.prepare import PrepareJobConfig, prepare

if __name__ == "__main__":
    sys.exit(run_job(PrepareJobConfig, prepare))
