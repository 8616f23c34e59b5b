"""The MLflow pyfunc of an exported embedding model, logged as "model from code".

MLflow stores this file as the model's code and runs it at load time; the weights travel as
the export's own files (``model.safetensors`` + ``config.json``) in the model's artifacts.
Nothing is pickled: loading runs this project's code over safetensors weights, never an
object someone else serialised.

Input: a DataFrame with ``image`` (encoded image bytes: JPEG/PNG/...) and, for a model
trained with SIE cameras, ``camera`` (int). Output: N×D float32, L2-normalised, the same
vectors as ``reidscale.embed.embed_images`` on the same bytes.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class EmbeddingPyfunc(PythonModel):
    def load_context(self, context):
        self.model_dir = context.artifacts["embedding_model"]

    def predict(self, context, model_input, params=None):
        from reidscale.embed import embed_images

        images = [bytes(b) for b in model_input["image"]]
        cameras = None
        if "camera" in model_input and not model_input["camera"].isna().all():
            cameras = model_input["camera"].to_numpy(dtype=np.int64)
        vectors, ok = embed_images(self.model_dir, images, cameras=cameras)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            raise ValueError(f"rows {bad[:10].tolist()} ({len(bad)} in all) are not decodable images")
        return vectors


mlflow.models.set_model(EmbeddingPyfunc())
