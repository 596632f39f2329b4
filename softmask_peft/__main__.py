"""`python -m softmask_peft` runs the `softmask-peft` command."""

import sys

from .cli import main

sys.exit(main())
