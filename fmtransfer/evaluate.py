"""`python -m fmtransfer.evaluate [overrides]`: the same as `fmtransfer evaluate`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("evaluate", sys.argv[1:])
