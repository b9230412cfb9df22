"""`python -m fmtransfer.shadow [overrides]`: the same as `fmtransfer shadow`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("shadow", sys.argv[1:])
