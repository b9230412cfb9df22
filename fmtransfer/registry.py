"""`python -m fmtransfer.registry <action> [overrides]`: the same as `fmtransfer registry`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("registry", sys.argv[1:])
