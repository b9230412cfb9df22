"""`python -m fmtransfer.pretrain [overrides]`: the same as `fmtransfer pretrain`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("pretrain", sys.argv[1:])
