"""Which build of the data path this process runs: compiled by mypyc, or the Python sources.

Installing Turnout (setup.py) compiles the modules the data path runs through with mypyc
when a C compiler is at hand, and records in proxy/_build.py a digest of each module's
source. Compiled code does not follow later edits of a source file, so a checkout edited
since its last install would run stale code: the sources are imported instead whenever one
of them changed, a compiled module is missing, or TURNOUT_PURE=1 is set. Always all of them
or none, since compiled modules reach into each other's classes directly.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = __name__.rpartition(".")[0]
HERE = Path(__file__).parent
SHARED_LIBRARY = "_native__mypyc"  # mypyc's runtime for the compiled group (setup.py)


def source_of(name: str) -> Path:
    """The source file of a module named relative to the package ("http.exchange")."""
    return HERE.joinpath(*name.split(".")).with_suffix(".py")


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class SourcesFirst(importlib.abc.MetaPathFinder):
    """Imports the named modules of the package from their .py files, past any compiled ones."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(f"{PACKAGE}.{name}" for name in modules)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        return importlib.util.spec_from_file_location(
            fullname, source_of(fullname.partition(".")[2])
        )


def _compiled(name: str) -> bool:
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    stem = source_of(name).with_suffix("")
    return any(stem.with_name(stem.name + suffix).exists() for suffix in suffixes)


def _choose() -> tuple[str, str]:
    try:
        record = importlib.import_module(f"{PACKAGE}._build")  # written by setup.py
    except ImportError:
        return "source", "not compiled when installed"
    sources: dict[str, str] = record.SOURCES
    if os.environ.get("TURNOUT_PURE"):
        why = "TURNOUT_PURE is set"
    else:
        changed = [name for name, digest in sources.items() if _source_changed(name, digest)]
        missing = [name for name in (*sources, SHARED_LIBRARY) if not _compiled(name)]
        if not changed and not missing:
            return "compiled", "mypyc"
        if changed:
            edited = ", ".join(f"{name.replace('.', '/')}.py" for name in changed)
            why = f"{edited} changed since the install"
            why += " (reinstall to compile)"
        elif len(missing) > len(sources):
            why = "the install could not compile it (is a C compiler installed?)"
        else:
            why = f"compiled modules missing: {', '.join(missing)} (reinstall to compile)"
    sys.meta_path.insert(0, SourcesFirst(list(sources)))
    return "source", why


def _source_changed(name: str, digest: str) -> bool:
    try:
        return source_digest(source_of(name)) != digest
    except OSError:
        return False  # an install without the sources runs what it has


BUILD, WHY = _choose()


def describe() -> str:
    """One line for the startup banner."""
    if BUILD == "compiled":
        return "data path compiled (mypyc)"
    return f"data path from Python sources: {WHY}"
