"""Reference statistics: what monitoring compares new data with, computed once per model and reference data.

Stored as two files side by side (never a pickle): ``<name>.npz`` (arrays: probabilities, embeddings, targets,
the PCA, the OOD leave-one-out scores) and ``<name>.json`` (the model's identity and sha256, the reference data's
name, split and content fingerprint, the settings, the temperature and threshold, and the .npz's sha256). A stored
file is reused when the model's sha256, the data's fingerprint and the settings match; otherwise it is recomputed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmtransfer.errors import ArtifactError
from fmtransfer.lineage.io import atomic_path, sha256_file, write_json_atomic
from fmtransfer.monitoring.drift import Pca, pca_split
from fmtransfer.monitoring.ood import KnnOod

FORMAT = "fmtransfer.monitor_reference"
FORMAT_VERSION = 1
_ARRAYS = ("probs", "embeddings", "targets", "pca_mean", "pca_components", "pca_fit", "ood_bank", "ood_scores")


@dataclass
class ReferenceStats:
    """A model's outputs on its reference data, and what monitoring derives from them.

    Attributes:
        identity: the model's identity (kind, path, sha256, backbone, embedding_dim, classes, preprocessing).
        data: ``{"recipe", "split", "fingerprint", "n"}`` of the reference data.
        settings: what the derived values depend on (``pca_components``, ``ood_k``, ``ood_quantile``).
        probs: (n, C) or None. embeddings: (n, d) float32 or None. targets: (n,) or None.
        temperature: fitted on the labelled reference (None without labels or probabilities).
        pca: the PCA fitted on the ``pca_fit`` half of the reference embeddings (None without embeddings); the
            embedding drift tests compare the other half (``compared_embeddings``) with the current data.
        pca_fit: (n,) bool, the samples the PCA was fitted on.
        ood: the k-NN scorer (None without embeddings), over ``ood.bank``: the reference embeddings, or a larger set
            of the model's embeddings of the same data (its train split).
    """

    identity: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    probs: np.ndarray | None
    embeddings: np.ndarray | None
    targets: np.ndarray | None
    temperature: float | None
    pca: Pca | None = None
    pca_fit: np.ndarray | None = None
    ood: KnnOod | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def compared_embeddings(self) -> np.ndarray | None:
        """The reference embeddings the drift tests compare (those the PCA was not fitted on)."""
        return None if self.embeddings is None else self.embeddings[~self.pca_fit]

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": self.identity, "data": self.data,
                "settings": self.settings, "temperature": self.temperature,
                "ood_threshold": self.ood.threshold if self.ood else None, "ood_k": self.ood.k if self.ood else None}

    def matches(self, sha256: str, fingerprint: str | None, settings: dict[str, Any]) -> list[str]:
        """What differs from a wanted (model sha256, data fingerprint, settings); empty: reusable."""
        differ = []
        if self.identity.get("sha256") != sha256:
            differ.append(f"model sha256 {str(self.identity.get('sha256'))[:12]}... there, {sha256[:12]}... now")
        if fingerprint is not None and self.data.get("fingerprint") != fingerprint:
            differ.append("the reference data's content fingerprint")
        differ += [f"{k}={self.settings.get(k)!r} there, {v!r} now" for k, v in settings.items()
                   if self.settings.get(k) != v]
        return differ

    def save(self, folder: str | Path, name: str) -> Path:
        """Write ``<folder>/<name>.npz`` then ``<name>.json`` (which records the .npz's sha256), atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"probs": self.probs, "embeddings": self.embeddings, "targets": self.targets,
                  "pca_mean": self.pca.mean if self.pca else None,
                  "pca_components": self.pca.components if self.pca else None, "pca_fit": self.pca_fit,
                  "ood_scores": self.ood.reference_scores if self.ood else None,
                  "ood_bank": self.ood.bank if self.ood and self.ood.bank.shape[0] != len(self.embeddings) else None}
        npz = folder / f"{name}.npz"
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: v for k, v in arrays.items() if v is not None})
        header = {**self.header(), "arrays": npz.name, "arrays_sha256": sha256_file(npz)}
        path = write_json_atomic(folder / f"{name}.json", header)
        self.files = {"json": str(path), "npz": str(npz)}
        return path


def load_reference(path: str | Path) -> ReferenceStats:
    """Read stored reference statistics (``.json``, or its ``.npz`` beside it); the arrays are checked against the
    sha256 the .json records and read without pickles.

    Raises:
        ArtifactError: missing, not reference statistics, or arrays changed since they were written.
    """
    path = Path(path).expanduser()
    path = path.with_suffix(".json") if path.suffix == ".npz" else path
    try:
        header = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"reference statistics {path} cannot be read ({type(e).__name__}); expected the .json "
                            f"that `fmtransfer monitor` writes beside its .npz") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not monitoring reference statistics (format "
                            f"{header.get('format') if isinstance(header, dict) else None!r}, expected {FORMAT!r})")
    npz = path.parent / header["arrays"]
    if not npz.is_file():
        raise ArtifactError(f"{path} names arrays {npz}, which do not exist")
    if sha256_file(npz) != header["arrays_sha256"]:
        raise ArtifactError(f"{npz}: sha256 differs from the one recorded in {path}; it was changed, recompute it")
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in _ARRAYS if k in z.files}
    pca = Pca.from_arrays(arrays["pca_mean"], arrays["pca_components"]) if "pca_mean" in arrays else None
    ood = None
    if "embeddings" in arrays and "ood_scores" in arrays:
        ood = KnnOod.from_arrays(arrays.get("ood_bank", arrays["embeddings"]), header["ood_k"],
                                 header["settings"]["ood_quantile"], arrays["ood_scores"])
    return ReferenceStats(header["model"], header["data"], header["settings"], arrays.get("probs"),
                          arrays.get("embeddings"), arrays.get("targets"), header["temperature"], pca,
                          arrays.get("pca_fit"), ood, {"json": str(path), "npz": str(npz)})


def build_reference(identity: dict[str, Any], data: dict[str, Any], settings: dict[str, Any],
                    probs: np.ndarray | None, embeddings: np.ndarray | None,
                    targets: np.ndarray | None, ood_bank: np.ndarray | None = None) -> ReferenceStats:
    """Derive the temperature (labelled probabilities only), the PCA and the OOD scorer (embeddings only).

    Args:
        settings: ``pca_components``, ``ood_k``, ``ood_quantile``, ``ood_scale_k``.
        ood_bank: the embeddings the OOD scores are measured against (default: ``embeddings``).
    """
    from fmtransfer.monitoring.calibration import fit_temperature

    temperature = fit_temperature(probs, targets) if probs is not None and targets is not None else None
    pca = ood = fit = None
    if embeddings is not None:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        fit = pca_split(len(embeddings))
        pca = Pca(embeddings[fit], int(settings["pca_components"]))
        bank = embeddings if ood_bank is None else np.asarray(ood_bank, dtype=np.float32)
        ood = KnnOod.fit(bank, int(settings["ood_k"]), float(settings["ood_quantile"]),
                         bool(settings.get("ood_scale_k", True)))
    return ReferenceStats(identity, data, dict(settings), probs, embeddings, targets, temperature, pca, fit, ood)
