"""How a `turnout` command ends: the exit codes every command shares."""

from typing import Final

EXIT_OK: Final = 0
EXIT_RUNTIME: Final = 1  # it ran and failed: a refused admin call, a listener it cannot bind
EXIT_USAGE: Final = 2  # bad usage or configuration
