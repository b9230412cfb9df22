"""`python -m fmtransfer.export [overrides]`: the same as `fmtransfer export`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("export", sys.argv[1:])
