"""`python -m fmtransfer <stage> ...`."""

from fmtransfer.cli import main

raise SystemExit(main())
