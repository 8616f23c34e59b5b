"""jobs/export_images.py: crops out of the shards as files, for jobs/search.py images=..."""

import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reidscale.config import load_config
from reidscale.data.export import ExportJobConfig, export_images, search_command
from reidscale.data.shards import ShardError, read_manifest, split_files, write_dataset
from reidscale.data.sources.synthetic import SyntheticConfig, generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(generate(SyntheticConfig(num_identities=12, height=32, width=16, images_per_identity_median=6,
                                           seed=4)), root, source="synthetic", rows_per_group=8)
    return root


def _stored(data_dir, split):
    """row_id -> (image bytes, identity, camera), read straight from the shards."""
    out = {}
    for f in split_files(data_dir, split):
        t = pq.read_table(f, columns=["row_id", "image", "identity", "camera"]).to_pydict()
        for r, im, i, c in zip(t["row_id"], t["image"], t["identity"], t["camera"]):
            out[r] = (im, i, c)
    return out


def test_exported_files_are_the_stored_bytes_named_with_their_identity(data_dir, tmp_path):
    summary = export_images(load_config(ExportJobConfig, overrides=[f"data_dir={data_dir}", "split=query", "limit=5",
                                                                    f"out_dir={tmp_path}"]))
    stored = _stored(data_dir, "query")
    assert [e["row_id"] for e in summary["images"]] == sorted(stored)[:5]  # shard order = row_id order
    for e in summary["images"]:
        data, identity, camera = stored[e["row_id"]]
        assert Path(e["file"]).read_bytes() == data  # never re-encoded
        assert (e["identity"], e["camera"]) == (identity, camera)
        assert Path(e["file"]).name == f"{e['row_id']:07d}_id{identity}_c{camera}.jpg"
        assert Image.open(io.BytesIO(data)).format == "JPEG"
    assert json.loads((tmp_path / "exported.json").read_text())["images"] == summary["images"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(e["file"]).name for e in summary["images"]]
                                                                 + ["exported.json"])


def test_identities_filter_and_no_limit_export_every_image_of_them(data_dir, tmp_path):
    stored = _stored(data_dir, "gallery")
    pick = sorted({v[1] for v in stored.values()})[:2]
    summary = export_images(load_config(ExportJobConfig, overrides=[
        f"data_dir={data_dir}", "split=gallery", "limit=0", f"identities=[{pick[0]},{pick[1]}]", f"out_dir={tmp_path}"]))
    expected = sorted(r for r, v in stored.items() if v[1] in pick)
    assert [e["row_id"] for e in summary["images"]] == expected
    with pytest.raises(ValueError, match="no gallery rows with identities \\[999999\\]"):
        export_images(load_config(ExportJobConfig, overrides=[f"data_dir={data_dir}", "split=gallery",
                                                              "identities=[999999]", f"out_dir={tmp_path / 'x'}"]))


def test_a_tampered_split_is_refused_before_anything_is_written(data_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    victim = copy / read_manifest(copy)["splits"]["query"]["shards"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=victim.name):
        export_images(ExportJobConfig(data_dir=str(copy), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_the_job_prints_files_identities_and_a_search_command_that_parses(data_dir, tmp_path):
    from reidscale.index.search import SearchJobConfig

    out = tmp_path / "q"
    run = subprocess.run([sys.executable, str(REPO / "jobs" / "export_images.py"), f"data_dir={data_dir}",
                          "split=query", "limit=3", f"out_dir={out}", f"index_dir={tmp_path}"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    listing = json.loads((out / "exported.json").read_text())["images"]
    for e in listing:
        assert any(line.split()[:3] == [str(e["identity"]), str(e["camera"]), str(e["row_id"])]
                   and line.endswith(e["file"]) for line in run.stdout.splitlines())
    command = [line.strip() for line in run.stdout.splitlines() if "jobs/search.py" in line][0]
    assert command == search_command({"images": listing}, str(tmp_path))
    # the printed command is a valid jobs/search.py config (every image file exists, one camera each)
    args = shlex.split(command)[2:]
    cfg = load_config(SearchJobConfig, overrides=args)
    assert cfg.images == [e["file"] for e in listing] and cfg.cameras == [e["camera"] for e in listing]
    assert all(np.asarray(Image.open(f)).shape == (32, 16, 3) for f in cfg.images)
