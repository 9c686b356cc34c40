"""The load-tested cutover runner: one short scenario end to end, and its bookkeeping."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cutover(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("loadtests.cutover")


@pytest.mark.timeout(150)
def test_eager_cutover_under_load_end_to_end(tmp_path: Path) -> None:
    # Real upstreams, the real proxy and locust as subprocesses: 8 s of load, 5 users.
    argv = [sys.executable, "-m", "loadtests.cutover", "--scenario", "eager"]
    argv += ["--duration", "8", "--users", "5", "--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "eager: PASSED" in done.stdout
    for name in ("eager.json", "eager.png", "eager.html", "eager_stats.csv", "eager_timeline.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "eager.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "eager.json").read_text())
    assert report["status"] == "passed"
    assert report["final"]["state"] == "promoted"
    assert report["final"]["split"] == 100.0
    assert report["failed_get"] == report["failed_post"] == 0
    before, after = report["phases"]["before"], report["phases"]["after"]
    assert before["requests"] > 0
    assert after["requests"] > 0
    # Phases go by the time a client sent its request: one sent just before the flip may reach
    # the proxy just after it, so "before" is all blue but for such stragglers.
    assert before["share"].get("blue", 0.0) > 90.0
    assert after["share"] == {"green": 100.0}
    assert any(e["kind"] == "rollout" and e.get("after") == "promoted" for e in report["events"])
    # Every subprocess was stopped: nothing listens any more on the ports the run used.
    config = yaml.safe_load((tmp_path / "logs" / "eager.yaml").read_text())
    ports = [config["listen"]["port"], config["admin"]["port"]]
    ports += [int(u["url"].rsplit(":", 1)[1]) for p in ("blue", "green")
              for u in config["pools"][p]["upstreams"]]  # fmt: skip
    for port in ports:
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
            pass


def test_checks_fail_a_scenario_for_failed_requests_and_wrong_state(cutover: ModuleType) -> None:
    scenarios = cutover.SCENARIOS
    hit = cutover.Hit(1.0, "GET", "/api/items/[id]", 200, "blue", 1.0, False, "")

    def judged(name: str, **fields: object) -> list[str]:
        report = cutover.Report(name, "")
        report.final = {"state": "promoted", "split": 100.0}
        for key, value in fields.items():
            setattr(report, key, value)
        cutover.check(report, scenarios[name], [hit])
        return list(report.reasons)

    assert judged("eager") == []
    assert judged("eager", failed_get=1) == ["1 failed GET request(s); expected none"]
    assert judged("eager", failed_post=2) == ["2 failed POST request(s); expected none"]
    assert judged("eager", final={"state": "rolled_back", "split": 0.0}) == [
        "the rollout ended rolled_back; expected promoted",
        "the split ended at 0.0; expected 100",
    ]
    bad = {"state": "rolled_back", "split": 0.0}
    # A POST to a failing candidate is not retried, so not shielded: allowed there, GETs not.
    assert judged("adaptive-bad", final=bad, failed_post=3) == []
    assert judged("adaptive-bad", final=bad, failed_get=1) == [
        "1 failed GET request(s); expected none"
    ]
    assert judged("eager", sticky_back_flips=1) == [
        "1 sticky client(s) moved from green back to blue"
    ]


def test_percentile_is_nearest_rank(cutover: ModuleType) -> None:
    values = [float(v) for v in range(1, 101)]
    assert cutover.percentile(values, 50) == 50.0
    assert cutover.percentile(values, 99) == 99.0
    assert cutover.percentile(values, 100) == 100.0
    assert cutover.percentile([7.0], 99) == 7.0
    assert cutover.percentile([], 99) is None


def test_sticky_back_flips_counts_clients_moved_green_to_blue(cutover: ModuleType) -> None:
    def hit(t: float, upstream: str, sid: str) -> Any:
        return cutover.Hit(t, "GET", "/x", 200, upstream, 1.0, False, sid)

    hits = [
        hit(1, "blue", "a"),
        hit(2, "green", "a"),
        hit(3, "green", "a"),  # a: blue -> green only
        hit(1, "green", "b"),
        hit(2, "blue", "b"),
        hit(3, "green", "b"),
        hit(4, "blue", "b"),  # b moved back twice: one client
        hit(1, "green", ""),
        hit(2, "blue", ""),  # no cookie: not sticky
        hit(1, "green", "c"),
        hit(2, "-", "c"),  # an answer made by the proxy itself has no pool
        hit(3, "blue-2", "c"),  # blue-2 is an upstream of the blue pool
    ]
    assert cutover.sticky_back_flips(sorted(hits, key=lambda h: h.start)) == 2


def test_parse_metrics_reads_split_state_requests_and_rollback(cutover: ModuleType) -> None:
    text = """\
# TYPE turnout_requests counter
turnout_requests_total{pool="blue",upstream="http://a",code="200"} 90.0
turnout_requests_total{pool="blue",upstream="http://b",code="200"} 10.0
turnout_requests_total{pool="green",upstream="http://c",code="200"} 40.0
turnout_requests_total{pool="green",upstream="http://c",code="503"} 5.0
# TYPE turnout_split_percent gauge
turnout_split_percent{pool="green"} 10.0
turnout_split_percent{pool="blue"} 90.0
# TYPE turnout_rollout_state gauge
turnout_rollout_state{state="progressing"} 0.0
turnout_rollout_state{state="rolled_back"} 1.0
# TYPE turnout_rescued counter
turnout_rescued_total 4.0
# TYPE turnout_rollback_seconds histogram
turnout_rollback_seconds_bucket{le="+Inf"} 1.0
turnout_rollback_seconds_count 1.0
turnout_rollback_seconds_sum 0.25
"""
    sample = cutover.parse_metrics(text, 3.0)
    assert sample.split == 10.0
    assert sample.state == "rolled_back"
    assert sample.requests == {"blue": 100.0, "green": 45.0}
    assert sample.errors == {"blue": 0.0, "green": 5.0}
    assert sample.rescued == 4.0
    assert (sample.rollback_count, sample.rollback_sum) == (1.0, 0.25)


def test_timeline_survives_a_counter_reset_after_a_restart(cutover: ModuleType) -> None:
    def sample(t: float, rescued: float, split: float) -> object:
        return cutover.Sample(t, split, "idle", {}, {}, rescued, 0.0, 0.0, 0.0)

    # A restarted proxy counts from zero again: 5 -> 7 -> (restart) 1 -> 3 rescued.
    samples = [sample(0.2, 5, 0.0), sample(1.2, 7, 0.0), sample(2.2, 1, 50.0), sample(3.2, 3, 50)]
    samples.insert(3, sample(2.7, 1, 10.0))
    hits = [
        cutover.Hit(0.5, "GET", "/x", 200, "blue", 1.0, False, ""),
        cutover.Hit(2.5, "GET", "/x", 200, "green", 1.0, False, ""),
        cutover.Hit(2.6, "POST", "/x", 503, "green", 1.0, True, ""),
        cutover.Hit(3.5, "GET", "/x", 200, "blue-2", 1.0, False, ""),
        cutover.Hit(3.6, "GET", "/x", 502, "-", 1.0, True, ""),
    ]
    seconds = cutover.timeline(hits, samples, 0.0, 6.0)
    assert len(seconds) == 4  # the seconds after the last request are left out
    assert [s.rescued for s in seconds] == [0.0, 2.0, 1.0, 2.0]
    assert [(s.split, s.split_peak) for s in seconds] == [
        (0.0, 0.0),
        (0.0, 0.0),
        (10.0, 50.0),
        (50.0, 50.0),
    ]
    assert [(s.pool("blue"), s.pool("green")) for s in seconds] == [(1, 0), (0, 0), (0, 2), (1, 0)]
    assert [(s.failed_get, s.failed_post) for s in seconds] == [(0, 0), (0, 0), (0, 1), (1, 0)]
    assert seconds[3].answered == {"blue-2": 1}
    assert seconds[2].realised_green == 100.0
    assert seconds[1].realised_green is None


def test_phases_split_hits_at_the_trigger_and_the_end_of_the_cutover(
    cutover: ModuleType,
) -> None:
    hits = [
        cutover.Hit(t, "GET", "/x", 200, pool, ms, False, "")
        for t, pool, ms in [
            (1, "blue", 1.0),
            (4, "blue", 2.0),
            (5, "green", 3.0),
            (9, "green", 4.0),
        ]
    ]
    hits.append(cutover.Hit(6, "GET", "/stream", 200, "green", 500.0, False, ""))
    phases = cutover.split_phases(hits, 0.0, 3.0, 8.0, 10.0)
    assert [phases[p].requests for p in ("before", "during", "after")] == [1, 3, 1]
    during = phases["during"]
    assert during.share == {"blue": 33.33, "green": 66.67}
    # The half-second stream is reported apart from the other requests' latency.
    assert (during.p99_ms, during.stream_p99_ms) == (3.0, 500.0)
    assert (during.seconds, phases["after"].seconds) == (5.0, 2.0)
    never_done = cutover.split_phases(hits, 0.0, 3.0, None, 10.0)
    assert never_done["after"].requests == 0
    assert never_done["during"].requests == 4


def test_hotpath_bench_runs_real_requests_through_the_protocols() -> None:
    # It checks each warm-up request's answer itself and exits non-zero if one is wrong; the
    # figures it prints are for people, so only their presence is checked here.
    argv = [sys.executable, "-m", "loadtests.hotpath", "--requests", "300", "--rounds", "1"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "turnout data path" in done.stdout
    assert "turnout / llhttp" in done.stdout
    # Many requests in flight at once: every one of them answered, checked as above.
    argv += ["--in-flight", "8"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 in flight" in done.stdout


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("h2load") is None,
    reason="needs valgrind and h2load (apt-get install valgrind nghttp2-client)",
)
def test_instructions_counts_a_build_and_compares_it_with_another() -> None:
    # The same build twice: every request is checked to succeed (the script exits non-zero
    # otherwise), each build's count is a real callgrind total, and two counts of one build
    # agree closely: what makes the figure worth quoting on a noisy machine.
    argv = [sys.executable, "-m", "loadtests.instructions", "--requests", "400"]
    argv += ["--warmup", "200", "--connections", "8", "--annotate", "5", "--cache-sim"]
    argv += ["--turnout-build", f"again={sys.executable}"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    pattern = r"^(turnout|again): ([\d,]+) instructions per request"
    counts = dict(re.findall(pattern, done.stdout, re.M))
    assert set(counts) == {"turnout", "again"}, done.stdout
    first, second = (int(counts[n].replace(",", "")) for n in ("turnout", "again"))
    assert first > 10_000  # a request through the proxy is tens of thousands of instructions
    assert abs(first - second) / first < 0.05
    assert "turnout / again:" in done.stdout
    assert "instructions executed in each function itself" in done.stdout
    # The simulated caches and branch predictor saw the same requests miss somewhere.
    pattern = r"^turnout: ([\d,.]+) (L1 data misses|branch mispredictions) per request"
    found = re.findall(pattern, done.stdout, re.M)
    misses = {what: float(n.replace(",", "")) for n, what in found}
    assert set(misses) == {"L1 data misses", "branch mispredictions"}, done.stdout
    assert all(0 < n < first for n in misses.values())
    assert re.search(r"^turnout / again: [\d.]+ \(branch mispredictions\)$", done.stdout, re.M)
