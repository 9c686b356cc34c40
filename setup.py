"""Turnout's build: the modules every proxied request runs through are compiled with mypyc.

The compiled modules are the same Python sources, type-checked (mypy strict) and turned into
C by mypyc, which roughly halves the interpreter's cost per request. proxy/native.py imports
the sources instead when the compiled modules are missing or older than the sources, so a
machine without a C compiler, or an edited checkout, still runs, only slower. Set
TURNOUT_PURE=1 to install without compiling; everything else is in pyproject.toml.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from setuptools import setup

# The data path: accept, parse, choose, admit, forward, relay, record; and what subclasses
# its classes (the worker processes' proxies and their shared breakers and limits), since
# interpreted classes cannot inherit compiled ones.
COMPILED = (
    "accesslog",
    "admission",
    "analysis",
    "balancer",
    "breaker",
    "exchange",
    "headers",
    "member",
    "retry",
    "router",
    "routing",
    "runtime",
    "server",
    "shared",
    "stats",
    "upstream",
    "workers",
)
HERE = Path(__file__).parent
BUILD_RECORD = HERE / "proxy" / "_build.py"


def record_sources() -> None:
    """What proxy/native.py checks the compiled modules against."""
    lines = [
        '"""Written by setup.py: the sources the compiled modules were built from."""',
        "",
        "SOURCES = {",
    ]
    for name in COMPILED:
        digest = hashlib.sha256((HERE / "proxy" / f"{name}.py").read_bytes()).hexdigest()
        lines.append(f'    "{name}": "{digest}",')
    lines += ["}", ""]
    BUILD_RECORD.write_text("\n".join(lines))


def extensions() -> list[object]:
    if os.environ.get("TURNOUT_PURE"):
        BUILD_RECORD.unlink(missing_ok=True)
        return []
    from mypyc.build import mypycify

    record_sources()
    try:
        modules = mypycify(
            [f"proxy/{name}.py" for name in COMPILED],
            group_name="proxy._native",
            opt_level="3",
        )
    except (Exception, SystemExit) as exc:
        # mypyc refused the code: say so loudly, and install the sources (proxy/native.py).
        print(f"setup.py: NOT COMPILED: mypyc failed: {exc}", file=sys.stderr)
        return []
    for module in modules:
        # Without a C compiler the install goes on and the sources run (proxy/native.py).
        module.optional = True
    return list(modules)


setup(ext_modules=extensions())
