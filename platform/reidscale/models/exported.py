"""What an exported embedding model directory says about itself, read without torch.

An export (``reid.export_embedding_model``) is ``model.safetensors`` + ``config.json``;
the config's ``weights_sha256`` (a hash of the state dict) is the model's identity that
embeddings, indexes, thresholds and registered versions are matched on. Readers that only
need the config (the serve ingress, the jobs checking a cache) use this module, so they
neither load the weights nor import torch.
"""

from __future__ import annotations

import json
from pathlib import Path

# what a "not an exported model" error tells the user to run: the training job exports one
MADE_BY = "exported models are made by python jobs/train_clipreid.py (<run_dir>/models/trained, models/best)"


def read_export_config(model_dir: str | Path) -> dict:
    """The parsed ``config.json`` of an export; FileNotFoundError naming the directory if it has none."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model_dir {model_dir}: no config.json; not an exported embedding model; {MADE_BY}")
    return json.loads(config_file.read_text())


def model_sha(model_dir: str | Path) -> str:
    """The export's ``weights_sha256`` ("" for an export that predates it)."""
    return read_export_config(model_dir).get("weights_sha256", "")
