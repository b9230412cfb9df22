"""`python -m fmtransfer.pipeline [overrides]`: the same as `fmtransfer pipeline`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("pipeline", sys.argv[1:])
