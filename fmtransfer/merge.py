"""`python -m fmtransfer.merge [overrides]`: the same as `fmtransfer merge`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("merge", sys.argv[1:])
