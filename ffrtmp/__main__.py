"""`python -m ffrtmp` runs the CLI."""

import sys

from ffrtmp.cli import main

sys.exit(main())
