"""The open-set threshold the service decides ``is_new`` with, and where it came from.

Order: the config's ``score_threshold`` (an operator's explicit choice) overrides the
file ``jobs/evaluate.py`` writes beside the index (``<index_dir>/open_set.json``: the
threshold at a target false-accept rate on the evaluated model). With neither the
service still searches and enrols, but answers ``is_new: null``: any built-in number
would be a decision nobody measured. A file for another model or metric is refused at
start-up: its threshold would be silently wrong for every query.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reidscale.index.metric import larger_is_closer

log = logging.getLogger(__name__)

OPEN_SET_FILE = "open_set.json"


@dataclass(frozen=True)
class OpenSetThreshold:
    value: float | None  # None: no decision is made
    metric: str  # "ip": same identity when score >= value; "l2": when squared L2 <= value
    source: str  # a sentence for GET /info
    details: dict  # the file's fields (target_far, tar_at_far, ...) when it came from one

    def is_new(self, best_scores: np.ndarray, best_identities: np.ndarray) -> list[bool | None]:
        """Per query: no identity passes the threshold (an empty gallery counts as new)."""
        if self.value is None:
            return [None] * len(best_scores)
        hit = best_identities >= 0
        same = best_scores >= self.value if larger_is_closer(self.metric) else best_scores <= self.value
        return [bool(not (h and s)) for h, s in zip(hit, same)]


def resolve_threshold(index_dir: str | Path, manifest: dict, score_threshold: float | None,
                      open_set_file: str = "") -> OpenSetThreshold:
    """The threshold to serve for the gallery whose manifest is ``manifest``; ValueError if a file is unusable."""
    metric = manifest["metric"]
    if score_threshold is not None:
        if not math.isfinite(score_threshold):
            raise ValueError(f"score_threshold: {score_threshold} is not finite")
        return OpenSetThreshold(float(score_threshold), metric, "score_threshold from the service config", {})
    path = Path(open_set_file) if open_set_file else Path(index_dir) / OPEN_SET_FILE
    if not path.is_file():
        if open_set_file:
            raise ValueError(f"open_set_file: {path} does not exist")
        source = (f"none: no score_threshold in the config and no {path} (written by jobs/evaluate.py); "
                  "is_new is null")
        log.warning("open-set threshold: %s", source)
        return OpenSetThreshold(None, metric, source, {})
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    value = data.get("score_threshold")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{path}: score_threshold {value!r} is not a finite number")
    if data.get("metric") != metric:
        raise ValueError(f"{path}: metric {data.get('metric')!r}, but the index uses {metric!r}; "
                         "re-run jobs/evaluate.py on this index or set score_threshold")
    model = manifest.get("model_sha256") or ""
    if model and data.get("model_sha256") and data["model_sha256"] != model:
        raise ValueError(f"{path}: threshold of model {str(data['model_sha256'])[:12]}, but the index holds "
                         f"embeddings of {model[:12]}; re-run jobs/evaluate.py or set score_threshold")
    far = data.get("target_far")
    source = data.get("source") or f"{path}"
    source = f"{path}: {source}" + (f" (target FAR {far})" if far is not None else "")
    return OpenSetThreshold(float(value), metric, source, data)
