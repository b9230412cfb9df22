"""`python -m fmtransfer.curate [overrides]`: the same as `fmtransfer curate`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("curate", sys.argv[1:])
