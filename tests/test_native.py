"""The compiled data path and its fallback: compiled modules run only while they match their
sources; otherwise, or with TURNOUT_PURE=1, every one of them is imported from its source,
and the proxy serves the same either way."""

from __future__ import annotations

import ast
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import SampleFactory, proxy_config
from helpers.processes import ProcessFactory

import proxy
from proxy import native

PACKAGE = Path(proxy.__file__).parent
WHICH = (
    "import proxy.native as n, proxy.http.exchange as e, proxy.http.headers as h; "
    "print(n.BUILD); print(n.WHY); print(e.__file__); print(h.__file__)"
)


def which(env: dict[str, str], cwd: Path | None = None) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", WHICH],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.splitlines()


def plain_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TURNOUT_PURE"}
    return env | extra


def test_the_build_in_use_is_the_one_imported() -> None:
    build, _, exchange, headers = which(plain_env())
    suffix = ".py" if build == "source" else ".so"
    if native.BUILD == "compiled":
        assert build == "compiled"
    assert exchange.endswith(suffix)
    assert headers.endswith(suffix)


def test_turnout_pure_imports_every_module_from_its_source() -> None:
    build, why, exchange, headers = which(plain_env(TURNOUT_PURE="1"))
    assert build == "source"
    assert exchange.endswith("exchange.py")
    assert headers.endswith("headers.py")
    if native.BUILD == "compiled":
        assert why == "TURNOUT_PURE is set"


@pytest.mark.skipif(native.BUILD != "compiled", reason="the data path is not compiled here")
def test_an_edited_source_is_not_shadowed_by_its_stale_compiled_module(tmp_path: Path) -> None:
    copy = tmp_path / "proxy"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "http" / "headers.py").open("a") as f:
        f.write("\nEDITED = True\n")
    env = plain_env(PYTHONPATH=str(tmp_path))
    build, why, exchange, headers = which(env, cwd=tmp_path)
    assert build == "source"
    assert why == "http/headers.py changed since the install (reinstall to compile)"
    # All of them, not only the edited one: compiled modules use each other's classes.
    assert exchange == str(copy / "http" / "exchange.py")
    assert headers == str(copy / "http" / "headers.py")


async def test_a_proxy_on_the_sources_serves(
    sample: SampleFactory,
    turnout: ProcessFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TURNOUT_PURE", "1")
    blue, green = await sample("blue"), await sample("green")
    process = await turnout(proxy_config([blue.url], [green.url]))
    await process.wait_line(re.compile(r"^turnout: data path from Python sources: TURNOUT_PURE"))
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(process.url + "/hello") as resp:
                assert resp.status == 200
                assert resp.headers["X-Upstream"] == "blue"


def test_an_install_removes_compiled_modules_it_no_longer_builds(tmp_path: Path) -> None:
    """A module taken out of setup.py's COMPILED keeps its old library beside its source in an
    in-place build, where Python would import it before the .py: the next install removes it."""
    build = runpy.run_path(str(PACKAGE.parent / "setup.py"), run_name="setup")
    suffix = ".cpython-311-x86_64-linux-gnu.so"
    (tmp_path / "http").mkdir()
    for name in ("config", "http/exchange", "http/gone", "_native__mypyc"):
        (tmp_path / f"{name}{suffix}").write_bytes(b"")
    build["remove_stale_libraries"](tmp_path)
    left = sorted(
        str(path.relative_to(tmp_path)).partition(".")[0] for path in tmp_path.rglob("*.so")
    )
    assert left == ["_native__mypyc", "http/exchange"]


def compiled_modules() -> list[str]:
    """The modules setup.py compiles."""
    return list(runpy.run_path(str(PACKAGE.parent / "setup.py"), run_name="setup")["COMPILED"])


def side_effects(bound: ast.expr | None) -> bool:
    """Whether evaluating `bound` could do something (a call other than len(), an await...)."""
    return bound is not None and any(
        isinstance(n, (ast.Await, ast.NamedExpr, ast.Yield))
        or (isinstance(n, ast.Call) and ast.unparse(n.func) != "len")
        for n in ast.walk(bound)
    )


def test_no_compiled_module_calls_inside_a_slice_bound() -> None:
    """mypyc evaluates a slice bound twice (`view[os.write(fd, view):]` wrote every page of the
    access log twice): in a compiled module a bound is a name or arithmetic, never a call."""
    found = []
    for name in compiled_modules():
        path = native.source_of(name)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Slice):
                found += [
                    f"{name}.py:{node.lineno}: {ast.unparse(bound)}"
                    for bound in (node.lower, node.upper, node.step)
                    if bound is not None and side_effects(bound)
                ]
    assert "http.exchange" in compiled_modules()
    assert found == []


def test_no_compiled_module_awaits_while_an_exception_is_on_its_way_out() -> None:
    """mypyc loses the exception in flight when a `finally` block (or an except handler)
    awaits (mypyc/mypyc#1114): a gRPC health probe's cleanup swallowed its task's
    cancellation, and the proxy's shutdown waited for that task for ever. In a compiled module
    neither awaits."""
    found = []
    for name in compiled_modules():
        path = native.source_of(name)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Try | ast.TryStar):
                continue
            cleanup = [*node.finalbody, *(s for h in node.handlers for s in h.body)]
            found += [
                f"{name}.py:{inner.lineno}"
                for statement in cleanup
                for inner in ast.walk(statement)
                if isinstance(inner, ast.Await | ast.AsyncWith | ast.AsyncFor)
            ]
    assert "http.h2upstream" in compiled_modules()
    assert found == []
