"""ONNX export: convolution taps that only ever read zero padding are dropped, and the outputs stay the same."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from fmtransfer.export.onnx_export import INPUT_NAME, _cropped_window, export_onnx
from fmtransfer.export.runtime import create_session


def _kernels(path):
    return [list(next(a.ints for a in n.attribute if a.name == "kernel_shape"))
            for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


def test_convolutions_over_small_maps_lose_their_padding_only_taps(tmp_path):
    torch.manual_seed(0)
    # on 4x4 images: 3x3 over 4x4 maps (every tap reads pixels, stride 1 or 2), stride 2 over 2x2 (one row and column of taps
    # only reads padding), then 3x3 over a 1x1 map (only the centre tap reads the input)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Flatten(),
                                torch.nn.Linear(16, 3)).eval()
    x = torch.randn(5, 1, 4, 4)
    full = export_onnx(model, x[:2], tmp_path / "full.onnx", task="classification", crop_padding=False)
    cropped = export_onnx(model, x[:2], tmp_path / "cropped.onnx", task="classification")
    assert _kernels(full) == [[3, 3]] * 4
    assert _kernels(cropped) == [[3, 3], [3, 3], [2, 2], [1, 1]]
    assert cropped.stat().st_size < full.stat().st_size
    with torch.inference_mode():
        reference = model(x).numpy()
    for path in (full, cropped):
        out = create_session(path).run(None, {INPUT_NAME: x.numpy()})[0]
        np.testing.assert_allclose(out, reference, atol=1e-5)


@pytest.mark.parametrize("size,kernel,stride,pad,dilation",
                         [c for c in itertools.product([1, 2, 3, 5], [1, 3, 5], [1, 2, 3], [1, 2], [1, 2])
                          if c[0] + 2 * c[3] >= (c[1] - 1) * c[4] + 1])
def test_a_cropped_kernel_computes_the_same_convolution(size, kernel, stride, pad, dilation):
    torch.manual_seed(size * 1000 + kernel * 100 + stride * 10 + pad + dilation)
    x, w = torch.randn(2, 3, size, size + 1), torch.randn(4, 3, kernel, kernel)
    attrs = {"strides": [stride] * 2, "dilations": [dilation] * 2, "pads": [pad] * 4}
    expected = F.conv2d(x, w, stride=stride, padding=pad, dilation=dilation)
    found = _cropped_window([size, size + 1], [kernel, kernel], attrs)
    if found is None:
        return  # nothing to drop (or it would take negative padding): the layer is left as it is
    window, pads = found
    assert any(s.stop - s.start < kernel for s in window)
    top, left, bottom, right = pads[0], pads[1], pads[2], pads[3]
    out = F.conv2d(F.pad(x, (left, right, top, bottom)), w[:, :, window[0], window[1]], stride=stride,
                   dilation=dilation)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


class _Tiny(torch.nn.Module):
    """A classifier's shape: ``features`` then ``head``, and forward = head(features(x))."""

    def __init__(self, head: int = 3):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(4, head) if head else torch.nn.Identity()

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_the_embedding_is_a_second_output_and_the_model_stays_in_eval(tmp_path, exporter):
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(5, 1, 6, 6)
    path = export_onnx(model, x[:2], tmp_path / "m.onnx", task="classification", exporter=exporter, embedding=True)
    session = create_session(path)
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]
    logits, embedding = session.run(None, {INPUT_NAME: x.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-5)
        np.testing.assert_allclose(embedding, model.features(x).numpy(), atol=1e-5)
    # the exporter restores the exported module's mode: the wrapper must not hand training mode back to the model
    assert not any(m.training for m in model.modules())


def test_without_the_flag_or_for_a_headless_model_there_is_one_output(tmp_path):
    x = torch.randn(2, 1, 6, 6)
    plain = export_onnx(_Tiny().eval(), x, tmp_path / "plain.onnx", task="classification")
    headless = export_onnx(_Tiny(head=0).eval(), x, tmp_path / "headless.onnx", task="embedding", embedding=True)
    assert [o.name for o in create_session(plain).get_outputs()] == ["logits"]
    assert [o.name for o in create_session(headless).get_outputs()] == ["embedding"]
