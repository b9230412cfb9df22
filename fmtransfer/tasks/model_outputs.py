"""One way to run any model the framework makes over a recipe: its probabilities, embeddings, targets and timing.

``open_model`` takes what a user would pass as ``model=``: a run dir, ``model.json`` / ``model.safetensors``, a
Lightning ``.ckpt``, an adapter ``.safetensors`` (over the base its header names, or ``adapter_base``), or an
exported ``.onnx`` (or an export run dir). The :class:`ModelRunner` it returns says what the model is
(``identity``) and runs it over a split of a data recipe (:meth:`ModelRunner.outputs`), reading the images with the
model's own preprocessing: the header's for PyTorch models, the embedded metadata's for ONNX.

Monitoring (drift, OOD, the label-free accuracy estimate) and shadow evaluation read models through here, so an
adapter, a plain model and its ONNX export are compared on the same footing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmtransfer.errors import ArtifactError, ConfigError, DataError

log = logging.getLogger(__name__)

ALL_ROWS = "all"  # a split value: every row of the recipe's table, whatever its split
EMBEDDING_OUTPUT = "embedding"  # the ONNX output name of the pre-head features, where an export has it


@dataclass
class ModelOutputs:
    """A model's outputs over a recipe's rows, in table-row order of ``rows``.

    Attributes:
        probs: (n, C) softmax; None for a head-less backbone or a regression model.
        embeddings: (n, d) float32 pre-head features; None where the model does not give them (an ONNX export
            without an ``embedding`` output).
        targets: (n,) int class indices (into ``classes``) where the recipe has labels, else None.
        classes: the model's class names, or None.
        rows: (n,) row ids into the recipe's sample table (for manifests).
        seconds: wall time of the model's forward passes only (no data loading), for latency and throughput.
        ids: (n,) the samples' ids in the recipe's table.
        regions: (n,) their region names.
        logits: (n, K) the head's raw outputs (logits, or a regression model's values); None without a head.
        paths: (n,) image files for file sources, else None.
        fingerprint: the recipe's content fingerprint (its sample table's), for run records.
        label_note: why the recipe's labels were not used (a new crop: classes the model does not have), else None.
    """

    probs: np.ndarray | None
    embeddings: np.ndarray | None
    targets: np.ndarray | None
    classes: list[str] | None
    rows: np.ndarray
    seconds: float
    ids: np.ndarray | None = None
    regions: np.ndarray | None = None
    logits: np.ndarray | None = None
    paths: list[str] | None = field(default=None, repr=False)
    fingerprint: str | None = None
    label_note: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def accuracy(self) -> float | None:
        """Top-1 accuracy where there are labels and probabilities, else None."""
        if self.probs is None or self.targets is None or not len(self.rows):
            return None
        return float((self.probs.argmax(1) == self.targets).mean())


def _onnx_path(path: Path) -> Path | None:
    if path.suffix.lower() == ".onnx":
        return path
    if path.is_dir() and (path / "model.onnx").is_file() and not (path / "model.json").is_file():
        return path / "model.onnx"
    return None


def _is_adapter(path: Path) -> bool:
    """Whether ``path`` is an adapter file (or a run dir holding one and no model)."""
    from fmtransfer.adapters.artifact import ADAPTER_FILE, ADAPTER_FORMAT

    if path.is_dir():
        return (path / ADAPTER_FILE).is_file() and not (path / "model.json").is_file()
    if path.suffix != ".safetensors" or path.name == "model.safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not safetensors: the model loader names what is wrong with it
        return False
    return any(f'"{ADAPTER_FORMAT}"' in value and _format(value) == ADAPTER_FORMAT for value in metadata.values())


def _format(raw: str) -> Any:
    try:
        header = json.loads(raw)
    except ValueError:
        return None
    return header.get("format") if isinstance(header, dict) else None


def open_model(ref: str | Path, *, adapter_base: str | Path | None = None, allow_unfinished: bool = False,
               force: bool = False) -> ModelRunner:
    """Open a model to run over data.

    Args:
        ref: a run dir, ``model.json`` / ``model.safetensors``, a Lightning ``.ckpt``, an adapter ``.safetensors``
            (or an adapt run dir), or an exported ``.onnx`` (or an export run dir).
        adapter_base: the base under an adapter (default: the one its header names).
        allow_unfinished: use an artifact whose run did not finish, with a warning.
        force: open an ONNX export its gates rejected.

    Raises:
        ConfigError: nothing named. ArtifactError: a missing, unreadable, edited or unfinished artifact (naming the
        path and what was expected).
    """
    if ref is None or str(ref).strip() == "":
        raise ConfigError("pass model=<run dir, model.json, .ckpt, adapter .safetensors or exported .onnx>")
    path = Path(ref).expanduser()
    if not path.exists():
        raise ArtifactError(f"model={ref}: no such file or folder (expected a run dir, model.json, "
                            f"model.safetensors, a .ckpt, an adapter .safetensors or an exported .onnx)")
    onnx = _onnx_path(path)
    if onnx is not None:
        if adapter_base:
            raise ConfigError(f"model={ref} is an ONNX export; an adapter base (adapter_base={adapter_base}) "
                              f"applies only to an adapter file")
        return OnnxRunner(onnx, force=force)
    from fmtransfer.adapters.loading import load_model_or_adapted

    if _is_adapter(path):
        loaded = load_model_or_adapted(adapter_base, path, allow_unfinished=allow_unfinished)
        return TorchRunner(loaded, "adapter")
    if adapter_base:
        raise ConfigError(f"adapter_base={adapter_base} was given but model={ref} is not an adapter file")
    return TorchRunner(load_model_or_adapted(path, allow_unfinished=allow_unfinished), "torch")


class ModelRunner:
    """A model ready to run over a recipe. ``identity``: kind (torch | adapter | onnx), path, sha256 (of what
    decides its outputs: the weights, or base + adapter, or the ONNX file), backbone, embedding_dim (None where
    the model gives no embedding), classes, preprocessing, task."""

    identity: dict[str, Any]
    meta: dict[str, Any]

    @property
    def gives_embeddings(self) -> bool:
        return self.identity["embedding_dim"] is not None

    def outputs(self, recipe: Any, split: str = "test", *, batch_size: int = 256, accelerator: str = "auto",
                limit: int | None = None, num_workers: int | str = "auto") -> ModelOutputs:
        """Run the model over ``split`` of ``recipe`` (``"all"``: every row of its table).

        Args:
            recipe: a :class:`~fmtransfer.data.Recipe` or a ``data`` config node.
            split: ``train``, ``val``, ``test`` or ``all``.
            batch_size: images per forward pass.
            accelerator: ``auto`` (a GPU where there is one), ``cpu`` or ``gpu`` (PyTorch models only).
            limit: the first ``limit`` rows of the split only.
            num_workers: DataLoader workers (``auto``: none for in-memory data).

        Raises:
            ConfigError: a recipe that does not fit the model (task, channels), a bad split or limit.
            DataError: a split with no samples.
        """
        from fmtransfer.data import build_datamodule, load_recipe
        from fmtransfer.data.datamodule import resolve_workers
        from fmtransfer.data.dataset import TableDataset

        if limit is not None and int(limit) < 1:
            raise ConfigError(f"limit={limit} must be a positive integer or None")
        recipe = recipe if hasattr(recipe, "source") and hasattr(recipe, "kind") else load_recipe(recipe)
        # the recipe's own classes first: data of a new crop (classes the model lacks) is still monitored, unlabelled
        dm = build_datamodule(recipe, {"batch_size": batch_size, "num_workers": num_workers},
                              model_meta=self._fit_meta(), model_classes=False, require_labels=False)
        table = dm.prepare()
        rows = np.arange(len(table)) if split == ALL_ROWS else table.indices(split)
        rows = rows[:int(limit)] if limit is not None else rows
        if not len(rows):
            raise DataError(f"recipe {recipe.name!r} has no samples in split {split!r} (sizes: {dm.split_sizes()})")
        from torch.utils.data import DataLoader

        ds = TableDataset(table, rows, dm.preprocess)
        loader = DataLoader(ds, batch_size=int(batch_size), shuffle=False,
                            num_workers=resolve_workers(num_workers, ds.paths is not None))
        logits, embeddings, seconds = self._run(loader, accelerator)
        from fmtransfer.export.runtime import softmax

        task = self.identity["task"]
        probs = softmax(logits) if logits is not None and task == "classification" else None
        targets, note = self._targets(table, rows, recipe.name)
        return ModelOutputs(probs=probs, embeddings=embeddings, targets=targets, label_note=note,
                            classes=self.identity["classes"], rows=rows, seconds=seconds, ids=table.ids[rows],
                            regions=table.regions[rows], logits=logits,
                            paths=[str(table.paths[r]) for r in rows] if table.paths is not None else None,
                            fingerprint=table.fingerprint)

    def _targets(self, table: Any, rows: np.ndarray, name: str) -> tuple[np.ndarray | None, str | None]:
        """The labels of ``rows`` as indices into the model's classes, or (None, why) where they cannot be."""
        if table.unlabelled is not None or table.classes is None:
            return None, None
        model_classes = self.identity["classes"]
        if not model_classes:
            return table.targets[rows].astype(np.int64), None
        index = {c: i for i, c in enumerate(model_classes)}
        present = [table.classes[t] for t in np.unique(table.targets[rows])]
        foreign = [c for c in present if c not in index]
        if foreign:
            return None, (f"recipe {name!r} has classes the model does not ({', '.join(foreign[:5])}"
                          f"{' ...' if len(foreign) > 5 else ''}; the model's: {', '.join(model_classes[:10])}): "
                          f"its labels are not used, so there is no accuracy (a new crop needs an adapter)")
        remap = np.array([index.get(c, -1) for c in table.classes], dtype=np.int64)
        return remap[table.targets[rows]], None

    def _fit_meta(self) -> Mapping[str, Any]:
        return self.meta

    def _run(self, loader, accelerator: str) -> tuple[np.ndarray | None, np.ndarray | None, float]:
        raise NotImplementedError


class TorchRunner(ModelRunner):
    """A PyTorch model, or a base with an adapter applied (``loaded``: what ``load_model_or_adapted`` read)."""

    def __init__(self, loaded: Any, kind: str):
        from fmtransfer.lineage.io import sha256_bytes
        from fmtransfer.models.classifier import has_head

        self.loaded, self.model, self.meta = loaded, loaded.model.eval(), loaded.meta
        weights = loaded.base_meta["weights_sha256"]
        if loaded.adapter is not None:  # base and adapter together decide the outputs
            digest = sha256_bytes(f"{weights}+{loaded.adapter['weights_sha256']}".encode())
            path = loaded.adapter["path"]
        else:
            digest, path = weights, str(loaded.path)
        self.identity = {"kind": kind, "path": str(path), "sha256": digest,
                         "backbone": loaded.base_meta["backbone"]["name"],
                         "embedding_dim": int(loaded.meta["embed_dim"]),
                         "classes": loaded.meta["classes"] if has_head(loaded.meta) else None,
                         "preprocessing": loaded.meta["preprocess"], "task": loaded.meta["task"]}

    def _run(self, loader, accelerator: str) -> tuple[np.ndarray | None, np.ndarray | None, float]:
        """One forward pass per batch gives both the features and the head's outputs (Lightning's predict would
        run the network once per kind of output)."""
        import torch

        from fmtransfer.models.classifier import has_head

        device = _torch_device(accelerator)
        model = self.model.to(device)
        head = has_head(self.meta)
        feats, outs, seconds = [], [], 0.0
        with torch.inference_mode():
            for x, _, _ in loader:
                x = x.to(device)
                start = time.perf_counter()
                f = model.features(x)
                o = model.head(f) if head else None
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - start
                feats.append(f.float().cpu().numpy())
                if o is not None:
                    outs.append(o.float().cpu().numpy())
        return (np.concatenate(outs) if head else None), np.concatenate(feats), seconds


def _torch_device(accelerator: str):
    import torch

    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ConfigError(f"accelerator={accelerator!r}; expected auto, cpu or gpu")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"accelerator={accelerator} but no CUDA device is available; use accelerator=cpu")
    return torch.device("cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu")


class OnnxRunner(ModelRunner):
    """An exported ONNX model (onnxruntime). Its embedding comes from a second graph output named ``embedding``
    where the export has one; otherwise ``embeddings`` is None and ``identity['embedding_dim']`` is None."""

    def __init__(self, path: Path, force: bool = False):
        from fmtransfer.export.runtime import OnnxModel
        from fmtransfer.lineage.io import sha256_file

        self.onnx = OnnxModel.load(path, force=force)
        self.meta = self.onnx.meta
        outputs = {o.name: o for o in self.onnx.session.get_outputs()}
        self.output_name = self.meta.get("output_name") or next(iter(outputs))
        task = self.meta["task"]
        if task == "embedding":  # a head-less backbone's only output is its embedding
            self.embedding_name: str | None = self.output_name
        else:
            self.embedding_name = EMBEDDING_OUTPUT if EMBEDDING_OUTPUT in outputs else None
        dim = None
        if self.embedding_name is not None:
            shape = outputs[self.embedding_name].shape
            dim = int(shape[-1]) if shape and isinstance(shape[-1], int) else None
            dim = dim or (int(self.meta["num_outputs"]) if task == "embedding" else -1)
        self.identity = {"kind": "onnx", "path": str(self.onnx.path), "sha256": sha256_file(self.onnx.path),
                         "backbone": self.meta.get("backbone"),
                         "embedding_dim": dim, "classes": self.meta.get("classes") if task != "embedding" else None,
                         "preprocessing": self.meta["preprocess"], "task": task}

    def _fit_meta(self) -> Mapping[str, Any]:
        task = self.meta["task"]
        return {"task": task, "num_outputs": 0 if task == "embedding" else int(self.meta["num_outputs"]),
                "preprocess": self.meta["preprocess"], "classes": self.identity["classes"]}

    def _run(self, loader, accelerator: str) -> tuple[np.ndarray | None, np.ndarray | None, float]:
        names = [self.output_name] if self.meta["task"] != "embedding" else []
        if self.embedding_name is not None:
            names.append(self.embedding_name)
        outs: list[list[np.ndarray]] = [[] for _ in names]
        seconds = 0.0
        for x, _, _ in loader:
            x = np.ascontiguousarray(x.numpy(), dtype=np.float32)
            start = time.perf_counter()
            got = self.onnx.session.run(names, {self.onnx.input_name: x})
            seconds += time.perf_counter() - start
            for part, array in zip(outs, got, strict=True):
                part.append(np.asarray(array, dtype=np.float32))
        arrays = [np.concatenate(p) for p in outs]
        logits = arrays[0] if self.meta["task"] != "embedding" else None
        embeddings = arrays[-1] if self.embedding_name is not None else None
        if embeddings is not None and self.identity["embedding_dim"] == -1:
            self.identity["embedding_dim"] = int(embeddings.shape[1])
        return logits, embeddings, seconds
