"""`python -m fmtransfer.monitor [overrides]`: the same as `fmtransfer monitor`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("monitor", sys.argv[1:])
