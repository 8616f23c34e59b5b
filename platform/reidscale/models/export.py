"""ONNX export of an embedding model (for serving without torch).

The graph takes ``images`` (N×3×H×W float32, normalised as in the model's transform config),
plus ``cameras`` (and ``views``), N int64, when the backbone uses side information, and
returns ``embeddings`` (N×D float32, L2-normalised), with a dynamic batch dimension. The
safetensors export (``reid.export_embedding_model``) stays the reference format; this is a
deployment copy, checked against it with ``onnx_parity``.

Needs ``onnx`` and ``onnxscript`` (torch's exporter) and, to check it, ``onnxruntime``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class _Graph(nn.Module):
    """The embedding model with positional id inputs, as the exporter wants them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, cameras: torch.Tensor | None = None,
                views: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(images, cameras=cameras, views=views)


def onnx_inputs(model: nn.Module) -> list[str]:
    """The graph's input names for this embedding model."""
    backbone = model.backbone
    names = ["images"]
    if getattr(backbone, "uses_side_info", False):
        names += [n for n, count in (("cameras", backbone.sie_cameras), ("views", backbone.sie_views)) if count]
    return names


def export_onnx(model: nn.Module, path: str | Path, image_size: tuple[int, int], *, opset: int = 18) -> Path:
    """Write ``model`` (an EmbeddingModel, put in eval mode) to ``path`` as one ONNX file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    names = onnx_inputs(model)
    h, w = image_size
    example = {"images": torch.randn(2, 3, h, w), **{n: torch.zeros(2, dtype=torch.int64) for n in names[1:]}}
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        # images and ids share the one batch dimension, which the exporter remarks on
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        program = torch.onnx.export(_Graph(model).eval(), (), kwargs=example, dynamo=True, verbose=False,
                                    input_names=names, output_names=["embeddings"],
                                    dynamic_shapes={n: {0: batch} for n in names}, opset_version=opset,
                                    external_data=False)
    program.save(str(path))
    return path


def onnx_parity(model: nn.Module, path: str | Path, inputs: list[torch.Tensor]) -> float:
    """Max |torch - onnxruntime| over ``inputs`` (images first, then ids as the graph takes them)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    (got,) = session.run(["embeddings"], feeds)
    names = onnx_inputs(model)
    kwargs = {name: t for name, t in zip(names[1:], inputs[1:])}
    with torch.no_grad():
        want = model.eval()(inputs[0], **kwargs).numpy()
    return float(np.abs(got - want).max())
