"""Data: recipes -> sample tables -> datasets -> one LightningDataModule.

Names are imported lazily, so torch-free code (``fmtransfer.data.images``, used by the ONNX predictor) can
import a submodule without pulling in torch and Lightning.
"""

from __future__ import annotations

from fmtransfer._lazy import lazy_getattr

_EXPORTS = {
    "RecipeDataModule": "fmtransfer.data.datamodule",
    "build_datamodule": "fmtransfer.data.datamodule",
    "check_fit": "fmtransfer.data.datamodule",
    "Preprocess": "fmtransfer.data.preprocess",
    "Recipe": "fmtransfer.data.recipe",
    "load_recipe": "fmtransfer.data.recipe",
    "SampleTable": "fmtransfer.data.table",
    "build_table": "fmtransfer.data.table",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
