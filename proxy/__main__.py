"""`python -m proxy` is `turnout`."""

import sys

from proxy.cli import main

sys.exit(main())
