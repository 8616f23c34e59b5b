"""MLflow conventions against a real SQLite tracking store: the embedding model as a logged and
registered pyfunc (signature, input example, loads back to the same vectors), datasets as run
inputs, the experiment opening in the model-training view."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from reidscale import tracking
from reidscale.data.transforms import TransformConfig
from reidscale.embed import embed_images
from reidscale.models.backbone import ModelConfig
from reidscale.models.reid import build_reid_model, export_embedding_model

TINY = ModelConfig(width=32, layers=1, heads=2, patch_size=8, embed_dim=16)
SIZE = TransformConfig(height=32, width=16)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "exp", "train-test", params={"a": 1})
    return uri, run_id, tmp_path


def test_logged_and_registered_model_loads_back_to_the_same_embeddings(store):
    import mlflow
    import pandas as pd

    uri, run_id, tmp_path = store
    __import__("torch").manual_seed(0)
    model_dir = export_embedding_model(build_reid_model(TINY, SIZE, 4).embedding, TINY, SIZE, tmp_path / "export")
    sha = json.loads((model_dir / "config.json").read_text())["weights_sha256"]
    info = tracking.log_embedding_model(uri, run_id, model_dir, "model-last", register_as="reid-embedder",
                                        tags={"weights_sha256": sha, "recipe": "baseline"})
    assert info["version"] is not None

    c = tracking.client(uri)
    version = c.get_model_version("reid-embedder", str(info["version"]))
    assert version.tags["weights_sha256"] == sha and version.tags["recipe"] == "baseline"

    images = [_jpeg(i) for i in range(5)]
    expected, ok = embed_images(model_dir, images)
    assert ok.all()
    loaded = mlflow.pyfunc.load_model(f"models:/reid-embedder/{info['version']}")
    got = np.asarray(loaded.predict(pd.DataFrame({"image": images})))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    meta = loaded.metadata
    assert [c.name for c in meta.get_input_schema().inputs] == ["image", "camera"]
    assert meta.get_output_schema().inputs[0].shape == (-1, 16)
    assert meta.saved_input_example_info is not None
    # the model's files are the export's safetensors + config.json, and no pickle anywhere
    local = mlflow.artifacts.download_artifacts(info["model_uri"], dst_path=str(tmp_path / "dl"))
    from pathlib import Path

    files = {p.name for p in Path(local).rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files

    with pytest.raises(Exception, match="not decodable"):
        loaded.predict(pd.DataFrame({"image": [b"not an image"]}))


def test_datasets_are_run_inputs_pointing_at_the_manifest(store):
    uri, run_id, tmp_path = store
    data = tmp_path / "data"
    data.mkdir()
    manifest = {"splits": {"train": {"images": 10, "identities": 3, "cameras": 2, "shards": ["a.parquet"]},
                           "query": {"images": 4, "identities": 2, "cameras": 2, "shards": ["q.parquet"]}}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    tracking.log_dataset(tracking.client(uri), run_id, data, manifest, ("train", "query"), "training")
    inputs = tracking.client(uri).get_run(run_id).inputs.dataset_inputs
    by_name = {d.dataset.name: d for d in inputs}
    assert set(by_name) == {"data/train", "data/query"}
    train = by_name["data/train"]
    source = json.loads(train.dataset.source)
    from reidscale.atomic import sha256_file

    assert source["uri"] == str((data / "manifest.json").resolve())
    assert source["sha256"] == sha256_file(data / "manifest.json")
    assert json.loads(train.dataset.profile) == {"images": 10, "identities": 3, "cameras": 2, "shards": 1}
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"


def test_experiment_is_tagged_for_the_model_training_view(store):
    uri, _, _ = store
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("exp")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
