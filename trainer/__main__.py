"""`python -m tidal.trainer CONFIG` (and `torchrun --nproc-per-node N -m tidal.trainer CONFIG`): the trainer daemon."""

import sys

from tidal.trainer.daemon import main

sys.exit(main())
