"""PyTorch model -> ONNX (dynamic batch axis, named input and output), checked with ``onnx.checker``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fmtransfer.errors import ArtifactError
from fmtransfer.export.runtime import METADATA_KEY, readable_props
from fmtransfer.lineage.io import seal_header

Exporter = Literal["torchscript", "dynamo"]
INPUT_NAME = "input"
# the second output (a model with a head and ``embedding=True``): the (n, d) pre-head features, for monitoring
EMBEDDING_OUTPUT = "embedding"


def output_name(task: str) -> str:
    """The ONNX output's name: ``logits`` (classification), ``embedding`` (a head-less backbone) or ``prediction``."""
    return {"classification": "logits", "embedding": EMBEDDING_OUTPUT}.get(task, "prediction")


def output_names(task: str, embedding: bool) -> list[str]:
    """The graph's outputs in order: the task's output, then ``embedding`` when asked for and the model has a head
    (a head-less backbone's only output is its embedding already)."""
    first = output_name(task)
    return [first, EMBEDDING_OUTPUT] if embedding and first != EMBEDDING_OUTPUT else [first]


class WithEmbedding(nn.Module):
    """A classifier's head output and its pre-head features from one forward pass: ``(head(f), f)``, f =
    ``model.features(x)`` (what ``model(x)`` computes on the way to its head, so the first output is unchanged)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        return self.model.head(features), features


def export_onnx(model: nn.Module, sample: torch.Tensor, path: str | Path, *, task: str, opset: int = 17,
                exporter: Exporter = "torchscript", crop_padding: bool = True, embedding: bool = False) -> Path:
    """Export ``model`` (eval mode, CPU, fp32) for inputs shaped like ``sample`` (N, C, H, W), batch axis dynamic.

    ``torchscript`` is the TorchScript-based exporter (``dynamo=False``); ``dynamo`` goes through
    ``torch.export``. Both write one self-contained file. Value-info annotations are dropped from the graph:
    onnxruntime's quantizer re-infers shapes, and stale annotations from the dynamo exporter break it.
    ``crop_padding``: drop the convolution taps that only ever read zero padding (:func:`crop_padding_taps`).
    ``embedding``: a model with a head gets a second output ``embedding``, its (N, d) pre-head features
    (:func:`output_names`).
    """
    import onnx

    path = Path(path)
    model = model.eval().float().cpu()
    outs = output_names(task, embedding)
    if len(outs) > 1:
        # eval() on the wrapper too: the exporter restores the exported module's mode afterwards, recursively, and a
        # new module is in training mode (the model would leave the export with its batch norms training)
        model = WithEmbedding(model).eval()
    with torch.inference_mode(False), torch.no_grad(), _quiet():
        try:
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(model, (sample,), str(path), input_names=[INPUT_NAME], output_names=outs,
                                  dynamic_shapes=({0: batch},), opset_version=max(opset, 18), dynamo=True,
                                  external_data=False, verbose=False)
            elif exporter == "torchscript":
                torch.onnx.export(model, (sample,), str(path), input_names=[INPUT_NAME], output_names=outs,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outs}},
                                  opset_version=opset, dynamo=False)
            else:
                raise ArtifactError(f"export.exporter={exporter!r}: choose torchscript or dynamo")
        except ArtifactError:
            raise
        except Exception as e:  # noqa: BLE001 - the exporters raise many types; name the model and the cause
            raise ArtifactError(f"ONNX export ({exporter}) of {type(model).__name__} failed: "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    proto = onnx.load(str(path))
    del proto.graph.value_info[:]
    if crop_padding:
        crop_padding_taps(proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def _touched_taps(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
                  dilation: int) -> tuple[int, int, int] | None:
    """Along one spatial axis of a convolution: (output size, first tap, last tap) of the kernel taps that read
    the input itself for at least one output position; the others only ever read zero padding. None when no tap
    does (an output made of padding alone)."""
    out = (size + pad_begin + pad_end - (kernel - 1) * dilation - 1) // stride + 1
    taps = [r for r in range(kernel) if any(0 <= o * stride - pad_begin + r * dilation < size for o in range(out))]
    return (out, taps[0], taps[-1]) if taps else None


def _cropped_window(shape: list[int], kernel: list[int], attrs: dict[str, Any]) -> tuple[list[slice], list[int]] | None:
    """The kernel slices and pads of an equivalent convolution without the padding-only taps (None: none to
    drop, or dropping them would need negative padding)."""
    n = len(kernel)
    strides, dilations = attrs.get("strides", [1] * n), attrs.get("dilations", [1] * n)
    pads = attrs.get("pads", [0] * 2 * n)
    window, begins, ends = [], [], []
    for ax in range(n):
        touched = _touched_taps(shape[ax], kernel[ax], strides[ax], pads[ax], pads[n + ax], dilations[ax])
        if touched is None:
            return None
        out, first, last = touched
        begin = pads[ax] - first * dilations[ax]
        size = last - first + 1
        end = (out - 1) * strides[ax] + (size - 1) * dilations[ax] + 1 - shape[ax] - begin
        if begin < 0 or end < 0:
            return None
        window.append(slice(first, last + 1))
        begins.append(begin)
        ends.append(end)
    if all(w.stop - w.start == k for w, k in zip(window, kernel, strict=True)):
        return None
    return window, begins + ends


def crop_padding_taps(proto: Any) -> list[str]:
    """Crops, in place, each convolution's kernel to the taps that ever read its input; returns the nodes changed.

    The input's spatial size is fixed by the export (only the batch axis is dynamic), so for a layer whose input
    is small against its kernel (ResNet-18's last stage on 28x28 images: 3x3 convolutions over 1x1 maps) most
    taps only ever multiply zero padding. Dropping them (and shrinking the padding to match) gives exactly the
    same outputs. fp32 kernels mostly skip padding already; onnxruntime's INT8 convolution does not, and there
    those layers cost more in INT8 than in fp32 (bench_export, issue #11). The weights dropped never mattered, so
    the file shrinks too.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.input, *inferred.graph.value_info]}
    weights = {i.name: i for i in proto.graph.initializer}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    cropped = []
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights
                or attrs.get("auto_pad", b"NOTSET") != b"NOTSET"):
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        shape = shapes.get(node.input[0], [])
        if len(shape) != weight.ndim or not all(shape[2:]):
            continue  # spatial size unknown: nothing can be said about its padding
        found = _cropped_window(shape[2:], list(weight.shape[2:]), attrs)
        if found is None:
            continue
        window, pads = found
        kept = np.ascontiguousarray(weight[(slice(None), slice(None), *window)])
        name = node.input[1] if uses[node.input[1]] == 1 else f"{node.input[1]}_cropped_{len(cropped)}"
        if name == node.input[1]:
            weights[name].CopyFrom(numpy_helper.from_array(kept, name))
        else:
            proto.graph.initializer.append(numpy_helper.from_array(kept, name))
            node.input[1] = name
        del node.attribute[:]
        attrs.update(kernel_shape=list(kept.shape[2:]), pads=pads)
        node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attrs.items())
        cropped.append(node.name)
    return cropped


def embed_metadata(path: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``meta``, sealed with its ``header_sha256``, into the model's ``metadata_props`` (key ``fmtransfer``,
    plus readable copies of the classes, task and preprocessing for tools that only list keys). Rewrites ``path``
    in place.

    Returns:
        the sealed metadata, as a reader gets it back.
    """
    import onnx

    meta = seal_header(meta)
    proto = onnx.load(str(path))
    props = {METADATA_KEY: json.dumps(meta, sort_keys=True), **readable_props(meta)}
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "fmtransfer"
    onnx.save(proto, str(path))
    return meta


@contextlib.contextmanager
def _quiet():
    """The exporters print progress lines and tracer warnings that say nothing to a user."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)
