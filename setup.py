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

HERE = Path(__file__).parent
# The data path, compiled whole: every module of logic/ (pure decisions) and http/ (accept,
# parse, choose, admit, forward, relay, record), named relative to the package. Then the proxy
# that composes them, whose attributes the data path reads per request, and the module of the
# worker processes' outcome recorder, which counts every request a worker serves.
COMPILED_FOLDERS = ("logic", "http")
COMPOSING = ("runtime", "procs.shared")
COMPILED = (
    tuple(
        f"{folder}.{path.stem}"
        for folder in COMPILED_FOLDERS
        for path in sorted((HERE / "proxy" / folder).glob("*.py"))
        if path.stem != "__init__"
    )
    + COMPOSING
)
BUILD_RECORD = HERE / "proxy" / "_build.py"


def source(name: str, package: Path = HERE / "proxy") -> Path:
    """The source file of a module named relative to the package ("http.exchange")."""
    return package.joinpath(*name.split(".")).with_suffix(".py")


def record_sources() -> None:
    """What proxy/native.py checks the compiled modules against."""
    lines = [
        '"""Written by setup.py: the sources the compiled modules were built from."""',
        "",
        "SOURCES = {",
    ]
    for name in COMPILED:
        digest = hashlib.sha256(source(name).read_bytes()).hexdigest()
        lines.append(f'    "{name}": "{digest}",')
    lines += ["}", ""]
    BUILD_RECORD.write_text("\n".join(lines))


def remove_stale_libraries(package: Path = HERE / "proxy") -> None:
    """An in-place build (pip install -e) leaves each compiled module beside its source, where
    Python imports it before the .py: a module that left COMPILED would go on running its old
    compiled code. Remove every compiled module of the package that this build will not make."""
    keep = {source(name, package).with_suffix("") for name in COMPILED}
    keep.add(package / "_native__mypyc")
    for library in package.rglob("*.so"):
        if library.with_name(library.name.partition(".")[0]) not in keep:
            library.unlink()


def extensions() -> list[object]:
    remove_stale_libraries()
    if os.environ.get("TURNOUT_PURE"):
        BUILD_RECORD.unlink(missing_ok=True)
        return []
    # Developers and CI set TURNOUT_REQUIRE_COMPILED=1: a compile error then fails the install
    # instead of quietly installing the sources.
    required = os.environ.get("TURNOUT_REQUIRE_COMPILED") == "1"
    from mypyc.build import mypycify

    record_sources()
    try:
        modules = mypycify(
            [str(source(name).relative_to(HERE)) for name in COMPILED],
            group_name="proxy._native",
            opt_level="3",
        )
    except (Exception, SystemExit) as exc:
        if required:
            raise
        # mypyc refused the code: say so loudly, and install the sources (proxy/native.py).
        print(f"setup.py: NOT COMPILED: mypyc failed: {exc}", file=sys.stderr)
        return []
    for module in modules:
        # Without a C compiler the install goes on and the sources run (proxy/native.py),
        # unless compiling is required.
        module.optional = not required
    return list(modules)


if __name__ == "__main__":  # as setuptools runs it; tests import the functions above
    setup(ext_modules=extensions())
