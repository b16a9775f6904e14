"""``python -m distillgate`` (and ``torchrun ... -m distillgate run ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
