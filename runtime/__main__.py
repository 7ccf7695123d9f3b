"""`python -m quantrt …` is the `quantrt` command."""

import sys

from quantrt.cli import main

sys.exit(main())
