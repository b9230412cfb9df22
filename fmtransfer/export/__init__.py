"""Edge export: merge -> ONNX -> INT8 -> parity and accuracy gates -> metadata; a predictor without torch.

The torch-free modules (``runtime``, ``predict``, ``triton``) import only numpy, PIL and onnxruntime, so a
serving box can run them; ``onnx_export`` and ``quantize`` belong to the export stage.
"""
