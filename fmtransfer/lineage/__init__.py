"""Lineage: run records, artifact hashes and atomic writes.

Names are imported lazily: ``fmtransfer.lineage.io`` (hashes, atomic writes) needs only the standard library,
so torch-free code such as the ONNX predictor can use it without loading the config stack.
"""

from __future__ import annotations

from fmtransfer._lazy import lazy_getattr

_EXPORTS = {
    "atomic_path": "fmtransfer.lineage.io", "sha256_file": "fmtransfer.lineage.io",
    "write_json_atomic": "fmtransfer.lineage.io", "write_text_atomic": "fmtransfer.lineage.io",
    "RunRecord": "fmtransfer.lineage.record", "config_hash": "fmtransfer.lineage.record",
    "load_record": "fmtransfer.lineage.record", "verify_record": "fmtransfer.lineage.record",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
