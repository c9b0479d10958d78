"""`python -m tidal ...` is the `tidal` console command."""

import sys

from tidal.cli import main

sys.exit(main())
