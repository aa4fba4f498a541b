"""`python -m dinfer`: the same entry point as the `dinfer` command."""

import sys

from dinfer.cli import main

sys.exit(main())
