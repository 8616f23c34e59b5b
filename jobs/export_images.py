"""Write crops of a prepared split as image files and print how to search the gallery with them.

    python jobs/export_images.py [--config FILE.yaml] [key=value ...]
    python jobs/export_images.py split=query limit=10
    python jobs/export_images.py data_dir=runs/demo/data split=query 'identities=[201,202]' limit=0 out_dir=/tmp/q

Prints identity, camera, row_id and file of each image, then a ready jobs/search.py command;
<out_dir>/exported.json lists the same.
"""

import sys

from reidscale.cli import run_job
from reidscale.data.export import ExportJobConfig, run_export

if __name__ == "__main__":
    sys.exit(run_job(ExportJobConfig, run_export))
