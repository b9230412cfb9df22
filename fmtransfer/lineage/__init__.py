"""Lineage: run records, artifact hashes and atomic writes."""

from fmtransfer.lineage.io import atomic_path, sha256_file, write_json_atomic, write_text_atomic
from fmtransfer.lineage.record import RunRecord, config_hash, load_record, verify_record

__all__ = [
    "RunRecord", "atomic_path", "config_hash", "load_record", "sha256_file", "verify_record",
    "write_json_atomic", "write_text_atomic",
]
