"""`python -m trainer CONFIG` (and `torchrun --nproc-per-node N -m trainer CONFIG`): the trainer daemon."""

import sys

from trainer.daemon import main

sys.exit(main())
