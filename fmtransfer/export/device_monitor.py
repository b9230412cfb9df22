"""Monitoring on the device: ``predict``'s per-image OOD scores and its batch's drift statistics, computed from the
ONNX model's own ``embedding`` output against the reference statistics ``export`` stores beside the file.

numpy, scipy, scikit-learn (the domain classifier) and FAISS (the k-NN search), through ``fmtransfer.monitoring``:
no torch, so it runs where ``predict`` runs. The reference (``monitoring/reference_<recipe>_<split>_<sha12>.json``
+ ``.npz``) is the one ``fmtransfer monitor`` uses too: the file's outputs on data it is known to work on, the OOD
bank (train-split embeddings), the OOD threshold and the temperature, keyed by the ONNX file's sha256.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmtransfer.errors import ArtifactError, ConfigError, DataError
from fmtransfer.monitoring.calibration import estimated_accuracy
from fmtransfer.monitoring.drift import MIN_SAMPLES, check_finite, check_test_settings, run_tests, windows
from fmtransfer.monitoring.reference import FORMAT, ReferenceStats, load_reference

EMBEDDING_OUTPUT = "embedding"
REFERENCE_DIR = "monitoring"


@dataclass(frozen=True)
class DeviceMonitorSettings:
    """``predict``'s ``monitor`` node (see configs/predict.yaml).

    Attributes:
        reference: stored reference statistics (.json); None: the one beside the model with its sha256.
        alpha: significance level of every drift test.
        tests: the drift tests to run on the whole input (and on each window).
        permutations: MMD's permutations.
        window: also test consecutive windows of this many images, in input order; None: the whole input only.
    """

    reference: str | None
    alpha: float
    tests: tuple[str, ...]
    permutations: int
    window: int | None

    @classmethod
    def from_dict(cls, node: dict[str, Any]) -> DeviceMonitorSettings:
        allowed = {"enabled", "reference", "alpha", "tests", "permutations", "window"}
        unknown = sorted(set(node) - allowed)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(f'monitor.{k}' for k in unknown)}; allowed: "
                              f"{', '.join(sorted(allowed))}")
        try:
            s = cls(node["reference"], float(node["alpha"]), tuple(node["tests"] or ()), int(node["permutations"]),
                    None if node["window"] is None else int(node["window"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"monitor: missing or malformed key ({type(e).__name__}: {e}); see "
                              f"configs/predict.yaml") from None
        s.check()
        return s

    def check(self) -> None:
        check_test_settings(self.alpha, self.tests, self.permutations)
        least = 2 * max(MIN_SAMPLES.values())
        if self.window is not None and self.window < least:
            raise ConfigError(f"monitor.window={self.window} must be >= {least} (or null: no windows)")


def require_embedding(model_path: str | Path, output_names: list[str]) -> None:
    """Refuse a model whose graph has no ``embedding`` output: OOD scores and embedding drift need it.

    Raises:
        ArtifactError: naming the file and the export key that adds the output.
    """
    if EMBEDDING_OUTPUT not in output_names:
        raise ArtifactError(f"{model_path} has no '{EMBEDDING_OUTPUT}' output (its outputs: {output_names}), so "
                            f"monitor.enabled=true cannot score OOD or embedding drift with it: re-export the model "
                            f"with export.embedding_output=true")


def find_reference(model_path: str | Path, sha256: str, given: str | None) -> Path:
    """``given``, or the reference statistics in ``monitoring/`` beside the model that record its sha256.

    Raises:
        ArtifactError: none there (naming the folder and how to make one), or several (pass ``monitor.reference``).
    """
    if given:
        return Path(given).expanduser()
    folder = Path(model_path).parent / REFERENCE_DIR
    found = []
    for path in sorted(folder.glob("reference_*.json")):
        try:
            header = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(header, dict) and header.get("format") == FORMAT and \
                (header.get("model") or {}).get("sha256") == sha256:
            found.append(path)
    if not found:
        raise ArtifactError(f"no monitoring reference for {model_path} (sha256 {sha256[:12]}...) in {folder}: "
                            f"export writes one beside each released file (export.reference.enabled=true); or pass "
                            f"monitor.reference=<the .json that `fmtransfer monitor` stored for this model>")
    if len(found) > 1:
        raise ArtifactError(f"{len(found)} monitoring references for {model_path} in {folder} "
                            f"({', '.join(p.name for p in found)}); choose one with monitor.reference=<.json>")
    return found[0]


def open_reference(path: Path, model_path: str | Path, sha256: str, embedding_dim: int | None) -> ReferenceStats:
    """Stored reference statistics, checked to belong to this model (sha256, embedding dimension) and to hold
    what device monitoring needs (embeddings and an OOD bank).

    Raises:
        ArtifactError: another model's statistics, or statistics without embeddings.
    """
    stats = load_reference(path)
    theirs = stats.identity.get("sha256")
    if theirs != sha256:
        raise ArtifactError(f"monitor.reference={path} was computed with model {stats.identity.get('path')} (sha256 "
                            f"{str(theirs)[:12]}...), not {model_path} (sha256 {sha256[:12]}...); compare a model only "
                            f"with its own reference (re-export it, or run `fmtransfer monitor model={model_path}`)")
    if stats.embeddings is None or stats.ood is None:
        raise ArtifactError(f"monitor.reference={path} holds no embeddings or OOD bank (computed from a model "
                            f"output without 'embedding'); device monitoring needs both")
    dim = stats.embeddings.shape[1]
    if embedding_dim is not None and embedding_dim > 0 and dim != embedding_dim:
        raise ArtifactError(f"monitor.reference={path} has embeddings of dimension {dim}, {model_path}'s "
                            f"'embedding' output {embedding_dim}: they come from different backbones")
    return stats


class DeviceMonitor:
    """Scores ``predict``'s images against one model's reference statistics."""

    def __init__(self, stats: ReferenceStats, settings: DeviceMonitorSettings):
        self.stats, self.settings = stats, settings
        self.seconds = {"ood": 0.0, "drift": 0.0}

    def ood(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, d) embeddings of a batch -> (n,) OOD scores (distance to the k-th nearest bank embedding)."""
        start = time.perf_counter()
        scores = self.stats.ood.score(embeddings)
        self.seconds["ood"] += time.perf_counter() - start
        return scores

    def summary(self, probs: np.ndarray | None, embeddings: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
        """The input's OOD share, drift verdicts (whole input, and windows with ``settings.window``) and the
        label-free accuracy estimate, for predict's metrics.json.

        Raises:
            DataError: NaN or infinite probabilities or embeddings (a broken model or input).
        """
        check_finite(embeddings, "embeddings of the predicted images")
        if probs is not None:
            check_finite(probs, "probabilities of the predicted images")
        start = time.perf_counter()
        stats, s = self.stats, self.settings
        flags = stats.ood.flags(scores)
        out: dict[str, Any] = {
            "reference": stats.files.get("json"), "reference_data": stats.data,
            "model_sha256": stats.identity.get("sha256"), "n": int(len(scores)),
            "ood": {"k": stats.ood.k, "quantile": stats.ood.quantile, "threshold": stats.ood.threshold,
                    "bank": int(len(stats.ood.bank)), "flagged": int(flags.sum()),
                    "share": float(flags.mean()) if len(flags) else 0.0,
                    "mean_score": float(scores.mean()) if len(scores) else None},
            "drift": self._tests(probs, embeddings, None),
            "estimated_accuracy": (estimated_accuracy(probs, stats.temperature)
                                   if probs is not None and stats.temperature is not None and len(probs) else None),
        }
        if s.window is not None:
            out["windows"] = [{"first": int(w[0]), "last": int(w[-1]), "n": int(len(w)),
                               "ood_share": float(flags[w].mean()), "drift": self._tests(probs, embeddings, w)}
                              for w in windows(np.arange(len(scores)), s.window)]
        self.seconds["drift"] += time.perf_counter() - start
        out["seconds"] = dict(self.seconds)
        return out

    def _tests(self, probs: np.ndarray | None, embeddings: np.ndarray,
               rows: np.ndarray | None) -> dict[str, dict[str, Any]]:
        """Each configured test; one the input is too small for is skipped with the reason (predict runs on any
        number of images, a test needs a few)."""
        take = (lambda a: a) if rows is None else (lambda a: None if a is None else a[rows])
        reference = {"probs": self.stats.probs, "embeddings": self.stats.compared_embeddings}
        current = {"probs": take(probs), "embeddings": take(embeddings)}
        verdicts = {}
        for test in self.settings.tests:
            try:
                got = run_tests(reference, current, tests=(test,), alpha=self.settings.alpha, pca=self.stats.pca,
                                permutations=self.settings.permutations)[test]
                verdicts[test] = got.to_dict()
            except DataError as e:
                n = len(embeddings) if rows is None else len(rows)
                verdicts[test] = {"test": test, "detected": None, "p_value": None, "n_current": int(n),
                                  "skipped": str(e)}
        return verdicts
