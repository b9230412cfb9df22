"""Adapters: LoRA, visual prompts, linear probe, BitFit, full fine-tuning; calibration sets; adapter files."""

from fmtransfer.adapters.artifact import AdapterHost, read_adapter, save_adapter
from fmtransfer.adapters.calibration import Strategy
from fmtransfer.adapters.methods import (
    METHODS,
    VPT,
    AdapterMethod,
    BitFit,
    Full,
    LinearProbe,
    LoRA,
    Scratch,
    check_method_fits,
)

__all__ = ["METHODS", "VPT", "AdapterHost", "AdapterMethod", "BitFit", "Full", "LinearProbe", "LoRA", "Scratch",
           "Strategy", "check_method_fits", "read_adapter", "save_adapter"]
