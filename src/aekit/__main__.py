"""``python -m aekit`` (and ``torchrun -m aekit``) runs the CLI."""

import sys

from aekit.cli import main

sys.exit(main())
