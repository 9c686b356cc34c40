"""`turnout demo` in-process with a short duration: a good green ends promoted, a bad green
rolled back, both with no failed client request, a live progress display and a summary."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from proxy.cli import DEMO_MIN_DURATION, build_parser, main
from proxy.tools.demo import MIN_DURATION, PROGRESS_EVERY, Timeline, demo, demo_config

PROGRESS = re.compile(
    r"^\s*(?P<t>\d+\.\d)s (?P<state>\w+)\s+step (?P<step>[\d-]+)/[\d-]+ "
    r"split\s+(?P<split>[\d.]+)%"
    r" \|\s+blue\s+(?P<blue>\d+) req\s+[\d.]+% err p99 .+"
    r" \| green\s+(?P<green>\d+) req\s+(?P<green_err>[\d.]+)% err p99 .+"
    r" \| failed (?P<failed>\d+)$"
)


DASHBOARD = re.compile(r"^dashboard: (?P<base>http://127\.0\.0\.1:\d+)/ui \(while the demo runs\)$")


def progress(lines: list[str]) -> list[re.Match[str]]:
    return [m for line in lines if (m := PROGRESS.match(line))]


async def test_a_good_green_is_promoted_with_no_failed_request() -> None:
    lines: list[str] = []
    summary = await demo(False, 4.0, write=lines.append)
    assert summary.final_state == "promoted"
    assert summary.expected_state == "promoted"
    assert summary.failed == 0
    assert summary.errors == {}
    assert summary.ok
    assert summary.split == 100.0
    assert summary.stable == "green"
    assert summary.rollback_seconds is None
    assert summary.sent > 1000
    assert summary.share["blue"] > 0
    assert summary.share["green"] > 0
    assert abs(summary.share["blue"] + summary.share["green"] - 100.0) < 1e-6
    assert summary.elapsed < 4.0 * 1.3

    rows = progress(lines)
    # A line every PROGRESS_EVERY seconds, showing the walk through every step.
    assert len(rows) >= summary.elapsed / PROGRESS_EVERY - 1
    assert [float(r["t"]) for r in rows] == sorted(float(r["t"]) for r in rows)
    splits = [float(r["split"]) for r in rows]
    assert splits[0] == 0.0
    assert splits[-1] == 100.0
    assert splits == sorted(splits)
    assert {r["step"] for r in rows} >= {"1", "2", "3"}
    assert {r["state"] for r in rows} >= {"progressing", "promoted"}
    assert all(r["failed"] == "0" for r in rows)
    assert int(rows[-1]["blue"]) == 0
    assert int(rows[-1]["green"]) > 0
    narrated = [line.strip() for line in lines if line.lstrip().startswith(">>")]
    assert narrated[:4] == [
        ">> step 1: 5% of new requests to green",
        ">> step 2: 25% of new requests to green",
        ">> step 3: 50% of new requests to green",
        ">> step 4: 100% of new requests to green",
    ]
    assert narrated[4].startswith(">> promoted:")

    text = "\n".join(lines)
    assert "summary:" in text
    assert f"requests sent      {summary.sent} in" in text
    assert "failed requests    0 (expected 0)" in text
    assert "final state        promoted (expected promoted)" in text
    assert "time to rollback   n/a" in text
    assert "result             OK" in text


async def test_a_bad_green_is_rolled_back_and_blue_answers_for_it() -> None:
    lines: list[str] = []
    summary = await demo(True, 4.0, write=lines.append)
    assert summary.final_state == "rolled_back"
    assert summary.expected_state == "rolled_back"
    assert summary.failed == 0, summary.errors
    assert summary.ok
    assert summary.split == 0.0
    assert summary.stable == "blue"
    # Green's failures were answered by blue, and the analysis caught it fast.
    assert summary.rescued > 0
    assert summary.rollback_seconds is not None
    assert 0.0 < summary.rollback_seconds < 1.0
    assert summary.share["green"] < 5.0
    assert any(line.lstrip().startswith("!! breach: candidate error rate") for line in lines)
    rows = progress(lines)
    assert any(r["green_err"] != "0.0" for r in rows)  # the failures as they happen
    assert rows[-1]["state"] == "rolled_back"
    assert float(rows[-1]["split"]) == 0.0
    text = "\n".join(lines)
    assert "final state        rolled_back (expected rolled_back)" in text
    assert "ms from green's first failure to split 0" in text
    assert "failed requests    0 (expected 0)" in text


async def test_the_demo_serves_its_dashboard_while_it_runs() -> None:
    lines: list[str] = []
    seen: list[tuple[str, int, str]] = []
    told = asyncio.Event()

    def write(line: str) -> None:
        lines.append(line)
        if line.startswith("dashboard: "):
            told.set()

    async def visit() -> None:
        await told.wait()
        url = DASHBOARD.match(next(x for x in lines if x.startswith("dashboard: ")))
        assert url is not None
        async with aiohttp.ClientSession() as session:
            for path in ("/ui", "/status"):
                async with session.get(url["base"] + path) as resp:
                    seen.append((path, resp.status, await resp.text()))

    visitor = asyncio.ensure_future(visit())
    summary = await demo(False, 4.0, write=write)
    await asyncio.wait_for(visitor, 1.0)
    assert summary.ok
    assert [(path, code) for path, code, _ in seen] == [("/ui", 200), ("/status", 200)]
    assert "<title>Turnout dashboard</title>" in seen[0][2]
    assert '"rollout"' in seen[1][2]


def test_the_rollout_fits_the_duration() -> None:
    for duration in (MIN_DURATION, 4.0, 18.0, 60.0):
        timeline = Timeline.fit(duration)
        rollout = demo_config(1, 2, duration)["rollout"]
        interval = float(rollout["interval"].removesuffix("ms")) / 1000
        assert interval == pytest.approx(timeline.interval, abs=1e-3)
        held = len(rollout["steps"]) - 1  # the last step, 100, is promoted at once
        assert timeline.lead_in + held * interval + timeline.tail < duration
        assert timeline.tail >= 2 * PROGRESS_EVERY  # the display shows where traffic went


def test_the_command_exits_0_when_the_demo_ends_as_expected(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--bad-green", "--duration", "4s"]) == 0
    out = capsys.readouterr().out
    assert "rolled_back (expected rolled_back)" in out
    assert "result             OK" in out


@pytest.mark.parametrize(
    ("duration", "says"),
    [
        ("0", "the demo's duration (s) is 4 to 86400, not 0"),
        ("2s", "the demo's duration (s) is 4 to 86400, not 2s"),
        ("-5", "must not be negative"),
        ("-5s", "must not be negative"),
        ("nan", "must be finite"),
        ("soon", "expected a number with a unit"),
    ],
)
def test_a_demo_duration_out_of_range_is_a_usage_error(
    duration: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["demo", f"--duration={duration}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert says in err
    assert "Traceback" not in err


def test_the_demo_floor_is_the_demo_modules() -> None:
    assert DEMO_MIN_DURATION == MIN_DURATION
