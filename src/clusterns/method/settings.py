"""The objective's hyperparameters, their defaults and their validation, free of torch.

Imported by the workflow at start-up (``clusterns.config``) to refuse bad settings before any
job runs, so it must stay cheap to import. Decisions (each refusal names the key):

* ``kmeans: 0`` means plain unsupervised SimCSE. Because configs are merged over defaults,
  ``hard_negatives: true`` (the default) is accepted there and simply has no effect, whereas
  ``bml_weight > 0`` asks for a loss term that cannot exist without clusters and is refused.
* BML is zero for ``-β <= Δ <= -α``; that band is empty when ``α > β``, so with
  ``bml_weight > 0`` the config must have ``bml_alpha <= bml_beta``.
* ``kmeans: 1`` cannot give a second-nearest centroid: refused unless ``hard_negatives: false``.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

__all__ = ["ObjectiveConfig", "ObjectiveConfigError", "CENTROID_DTYPES"]


class ObjectiveConfigError(ValueError):
    """A ClusterNS objective setting that cannot work; the message names the key and the fix."""


CENTROID_DTYPES = ("embedding", "float32")
_FLOAT_KEYS = ("temp", "kmeans_lr", "kmean_cosine", "hard_negative_weight", "bml_weight", "bml_alpha", "bml_beta")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Hyperparameters of the objective (names as in the official ClusterNS arguments).

    temp: InfoNCE temperature. kmeans: number of centroids K (0 = plain SimCSE).
    kmeans_lr: momentum rate of the centroid update. kmean_cosine: clustering starts at the
    first step whose mean cross-view cosine is <= this. hard_negatives: append the
    second-nearest-centroid block to the logits. hard_negative_weight: added to that block's
    diagonal logits (ignored when hard negatives are off). bml_weight, bml_alpha, bml_beta:
    weight and margins of the BML term (α/β ignored when bml_weight is 0). centroid_dtype:
    ``embedding`` (official: centroids in the embedding's dtype, float16 under fp16 autocast,
    updated with the official arithmetic) or ``float32`` (centroids in float32, updated exactly).
    """

    temp: float = 0.05
    kmeans: int = 0
    kmeans_lr: float = 1e-3
    kmean_cosine: float = 0.4
    hard_negatives: bool = True
    hard_negative_weight: float = 0.0
    bml_weight: float = 0.0
    bml_alpha: float = 0.0
    bml_beta: float = 0.0
    centroid_dtype: str = "embedding"

    def __post_init__(self) -> None:
        self.validate()  # every instance is valid, so users of a config never re-check it

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ObjectiveConfig":
        """Build from a (merged) config mapping; missing keys or ``null`` values take the
        defaults, unknown keys and wrongly typed values are refused. Validated without a batch
        size (call :meth:`validate` with the global batch size before training)."""
        d = dict(d or {})
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ObjectiveConfigError(f"unknown objective key {key!r}{hint}; valid keys: {', '.join(known)}")
        values: dict[str, Any] = {}
        for key, value in d.items():
            if value is None:
                continue
            if key in _FLOAT_KEYS:
                values[key] = _as_float(key, value)
            elif key == "kmeans":
                values[key] = _as_int(key, value, lenient=True)
            elif key == "hard_negatives":
                if not isinstance(value, bool):
                    raise ObjectiveConfigError(f"hard_negatives must be true or false, got {value!r}")
                values[key] = value
            elif key == "centroid_dtype":
                values[key] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, global_batch_size: int | None = None) -> "ObjectiveConfig":
        """Refuse settings that cannot work (see the module docstring); returns ``self``.

        With ``global_batch_size`` also checks K <= global batch (initialisation picks K
        distinct samples of one global batch)."""
        for key in _FLOAT_KEYS:
            _as_float(key, getattr(self, key))
        _as_int("kmeans", self.kmeans)
        if not isinstance(self.hard_negatives, bool):
            raise ObjectiveConfigError(f"hard_negatives must be true or false, got {self.hard_negatives!r}")
        if self.centroid_dtype not in CENTROID_DTYPES:
            raise ObjectiveConfigError(f"centroid_dtype must be one of {', '.join(CENTROID_DTYPES)} (embedding = the "
                                       f"official float16-under-fp16 centroids), got {self.centroid_dtype!r}")

        if self.temp <= 0:
            raise ObjectiveConfigError(f"temp must be > 0 (the paper uses 0.05), got {self.temp}")
        if self.kmeans < 0:
            raise ObjectiveConfigError(f"kmeans must be >= 0 (0 = plain SimCSE, else the number of centroids), "
                                       f"got {self.kmeans}")
        if not 0.0 < self.kmeans_lr <= 1.0:
            raise ObjectiveConfigError(f"kmeans_lr must be in (0, 1] (the centroid momentum rate, e.g. 1e-3), "
                                       f"got {self.kmeans_lr}")
        if not -1.0 <= self.kmean_cosine <= 1.0:
            raise ObjectiveConfigError(f"kmean_cosine must be in [-1, 1] (a cosine threshold, e.g. 0.4), "
                                       f"got {self.kmean_cosine}")
        if self.bml_weight < 0:
            raise ObjectiveConfigError(f"bml_weight must be >= 0 (0 disables BML), got {self.bml_weight}")
        if self.kmeans == 0 and self.bml_weight > 0:
            raise ObjectiveConfigError(f"bml_weight={self.bml_weight} needs clustering, but clustering is off "
                                       f"(kmeans: 0): set kmeans > 0 or bml_weight: 0")
        if self.kmeans == 1 and self.hard_negatives:
            raise ObjectiveConfigError("kmeans: 1 cannot give hard negatives (they are the second-nearest "
                                       "centroid): set kmeans >= 2 or hard_negatives: false")
        if self.bml_weight > 0 and self.bml_alpha > self.bml_beta:
            raise ObjectiveConfigError(
                f"bml_alpha={self.bml_alpha} > bml_beta={self.bml_beta}: BML is zero only for "
                f"-bml_beta <= delta <= -bml_alpha, an empty band when alpha > beta; set bml_alpha <= bml_beta")
        if global_batch_size is not None:
            try:
                if isinstance(global_batch_size, bool):
                    raise TypeError
                batch = int(global_batch_size)
            except (TypeError, ValueError):
                raise ObjectiveConfigError(f"global batch size must be an integer, got {global_batch_size!r}") from None
            if batch < 1:
                raise ObjectiveConfigError(f"global batch size must be >= 1, got {batch}")
            if self.kmeans > batch:
                raise ObjectiveConfigError(
                    f"kmeans={self.kmeans} exceeds the global batch size {batch}: the centroids are "
                    f"initialised from {self.kmeans} distinct samples of one global batch; set kmeans <= {batch} "
                    f"or raise the batch size")
        return self


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = ""
        if isinstance(value, str):
            hint = (" (YAML 1.1 reads numbers like 1e-3 without a dot as strings: write 1.0e-3)")
        raise ObjectiveConfigError(f"{key} must be a number, got {value!r}{hint}")
    value = float(value)
    if not math.isfinite(value):
        raise ObjectiveConfigError(f"{key} must be finite, got {value}")
    return value


def _as_int(key: str, value: Any, *, lenient: bool = False) -> int:
    """An int; ``lenient`` (config parsing) also takes integral floats such as 128.0."""
    if lenient and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ObjectiveConfigError(f"{key} must be an integer, got {value!r}")
    return int(value)
