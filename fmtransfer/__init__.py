"""fmtransfer: global foundation model -> regional adapters -> edge."""

__version__ = "0.1.0"
