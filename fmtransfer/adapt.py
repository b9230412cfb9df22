"""`python -m fmtransfer.adapt [overrides]`: the same as `fmtransfer adapt`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("adapt", sys.argv[1:])
