"""`python -m rto` runs the `rto` command."""

import sys

from rto.cli import main

sys.exit(main())
