"""`python -m fmtransfer.plan [overrides]`: the same as `fmtransfer plan`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("plan", sys.argv[1:])
