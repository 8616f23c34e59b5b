"""Search a built gallery index: query images, a query split or query vectors → top-k identities.

    python jobs/search.py index_dir=runs/demo/index/trained images=a.jpg,b.jpg
    python jobs/search.py index_dir=runs/demo/index/trained data_dir=runs/demo/data split=query k=5 format=json
    python jobs/search.py index_dir=runs/demo/index/trained data_dir=runs/demo/data split=query exclude_same_camera=false
    python jobs/search.py index_dir=runs/scale/index/g1m vectors=queries.npy out=results.json
"""

import sys

from reidscale.cli import run_job
from reidscale.index.search import SearchJobConfig, run_search

if __name__ == "__main__":
    sys.exit(run_job(SearchJobConfig, run_search, print_summary=False))
