"""`python -m proxy` is `turnout`."""

import sys

from .cli import main

sys.exit(main())
