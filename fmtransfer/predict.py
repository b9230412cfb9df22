"""`python -m fmtransfer.predict [overrides]`: the same as `fmtransfer predict`."""

import sys

from fmtransfer.cli import run_stage

if __name__ == "__main__":
    run_stage("predict", sys.argv[1:])
