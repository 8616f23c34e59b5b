"""MLflow conventions against a real SQLite tracking store: the embedding model as a logged and
registered pyfunc (signature, input example, loads back to the same vectors), datasets as run
inputs, the experiment opening in the model-training view."""

import io
import json
from pathlib import Path

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


def test_log_models_logs_last_and_best_and_registers_best_with_its_lineage(store):
    """train/job.log_models on a run dir holding models/trained and models/best (different
    weights), with tracking.register_as: both are logged models of the run, each loads back to
    its own weights' embeddings, and only best becomes the registered version."""
    import mlflow
    import pandas as pd
    import torch

    from reidscale.atomic import sha256_file
    from reidscale.models.exported import model_sha, read_export_config
    from reidscale.train.config import TrainJobConfig
    from reidscale.train.job import log_models

    uri, run_id, tmp_path = store
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "manifest.json").write_text(json.dumps({"splits": {}, "num_classes": 4}))
    dirs = {}
    for seed, (name, sub) in enumerate((("model-last", "trained"), ("model-best", "best"))):
        torch.manual_seed(seed)
        dirs[name] = export_embedding_model(build_reid_model(TINY, SIZE, 4).embedding, TINY, SIZE,
                                            run_dir / "models" / sub)
    assert model_sha(dirs["model-last"]) != model_sha(dirs["model-best"])
    cfg = TrainJobConfig(run_dir=str(run_dir), data_dir=str(data_dir), recipe="baseline",
                         tracking=tracking.TrackingConfig(uri=uri, register_as="reid-embedder"))

    # log_models reads only cfg (its TrainInputs argument is unused)
    logged = log_models(cfg, run_id, uri, None)
    assert mlflow.active_run() is None  # logged against the given run, not a global active one

    c = tracking.client(uri)
    run = c.get_run(run_id)
    models = c.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    by_name = {m.name: m for m in models}
    assert set(by_name) == {"model-last", "model-best"}
    assert {o.model_id for o in run.outputs.model_outputs} == {m.model_id for m in models}

    images = [_jpeg(i) for i in range(4)]
    for name, directory in dirs.items():
        expected, ok = embed_images(directory, images)
        assert ok.all()
        got = np.asarray(mlflow.pyfunc.load_model(logged[name]["model_uri"]).predict(pd.DataFrame({"image": images})))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        # what loading needs is declared with the model (torch & co., not an empty list)
        reqs = Path(mlflow.pyfunc.get_model_dependencies(logged[name]["model_uri"])).read_text()
        assert "torch==" in reqs and "safetensors==" in reqs, reqs

    assert logged["model-last"]["version"] is None
    version = c.get_model_version("reid-embedder", str(logged["model-best"]["version"]))
    assert [v.version for v in c.search_model_versions("name = 'reid-embedder'")] == [version.version]
    # a SQLite store leaves ModelVersion.model_id empty; the source names the logged model
    assert by_name["model-best"].model_id in version.source and version.run_id == run_id
    assert version.tags == {"weights_sha256": model_sha(dirs["model-best"]),
                            "data_manifest_sha256": sha256_file(data_dir / "manifest.json"),
                            "recipe": "baseline", "reidscale.train_run_id": run_id}
    link = f"reid-embedder/{version.version}"
    assert run.data.tags["reidscale.model_versions"] == link
    # evaluate/build_index reach the same version and run from the export's config
    lineage = tracking.lineage_tags(c, {**read_export_config(dirs["model-best"]), "mlflow_run_id": run_id})
    assert lineage["reidscale.model_versions"] == link and lineage["reidscale.train_run_id"] == run_id
