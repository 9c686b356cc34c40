"""Command line: argument parsing, printing and exit codes; the work is done elsewhere."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from proxy.admin.client import add_client_commands
from proxy.config import (
    DEFAULT_CONFIG_YAML,
    Config,
    ConfigError,
    default_config,
    load_config,
    parse_duration,
)
from proxy.exits import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from proxy.http.accesslog import log_problems
from proxy.http.tls import tls_problems

DEFAULT_CONFIG_PATH = Path("config/turnout.yaml")
# The shortest demo that still shows a whole rollout (proxy.demo.MIN_DURATION; not imported
# from there, so that the commands that do not run the demo do not load it).
DEMO_MIN_DURATION = 4.0
# The sample upstream's bounds, as its /_control endpoint enforces them (proxy.sample; not
# imported from there for the same reason).
SAMPLE_MAX_LATENCY = 600.0
SAMPLE_ERROR_STATUSES = (400, 599)


def parse_duration_arg(value: str) -> float:
    """A duration on the command line: `20`, `20s`, `1m`, `250ms`."""
    try:
        number: float | None = float(value)
    except ValueError:
        number = None  # with a unit
    try:
        return parse_duration(value if number is None else number)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def bounded(
    cast: Callable[[str], float], low: float, high: float, what: str
) -> Callable[[str], float]:
    """An argparse type: `cast` of the value, refused outside [low, high] (usage error)."""

    def parse(value: str) -> float:
        try:
            number = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{what} is {low:g} to {high:g}, not {value}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turnout",
        description="A reverse proxy that moves live traffic between a blue and a green pool.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", help="config file (default: config/turnout.yaml if present)")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing one port and one rollout state (default 1)",
    )
    run.add_argument(
        "--takeover",
        action="store_true",
        help="take the listening sockets and the routing state over from a running turnout "
        "(hot restart; with or without --workers on either side)",
    )
    run.add_argument(
        "--takeover-socket",
        metavar="PATH",
        help="UNIX socket for hot restarts (default: derived from listen host and port)",
    )

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True, help="config file to validate")

    up = sub.add_parser("upstream", help="run a small sample service for demos and load tests")
    up.add_argument("--name", required=True, help="name it reports (e.g. blue)")
    up.add_argument("--port", type=bounded(int, 0, 65535, "a port"), required=True)
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument(
        "--error-rate",
        type=bounded(float, 0.0, 1.0, "a share of requests"),
        default=0.0,
        help="share of requests that fail",
    )
    up.add_argument(
        "--error-status",
        type=bounded(int, *SAMPLE_ERROR_STATUSES, "an error status"),
        default=500,
        help="status of the failed requests, 400 to 599 (default 500)",
    )
    up.add_argument(
        "--latency",
        type=bounded(parse_duration_arg, 0.0, SAMPLE_MAX_LATENCY, "the latency (s)"),
        default=0.0,
        help="added to every ordinary request, e.g. 50ms (at most 10m)",
    )

    demo = sub.add_parser("demo", help="self-contained demo of a cutover under live traffic")
    demo.add_argument("--bad-green", action="store_true", help="green fails a share of requests")
    demo.add_argument(
        "--duration",
        type=bounded(parse_duration_arg, DEMO_MIN_DURATION, 86400.0, "the demo's duration (s)"),
        default=18.0,
        help="e.g. 20s (default 18s, at least 4s)",
    )
    demo.add_argument(
        "--fleet",
        type=bounded(int, 2, 10, "the fleet's size"),
        default=0,
        metavar="N",
        help="N proxies (2-10) following one rollout through a local etcd (needs etcd)",
    )

    # Started by `turnout run --workers N`, not by people: no help line, so it is not listed.
    worker = sub.add_parser("worker")
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--workers", type=int, required=True)
    worker.add_argument("--listen-fd", type=int, required=True)
    worker.add_argument("--link-fd", type=int, required=True)

    add_client_commands(sub)
    return parser


def resolve_config(path: str | None) -> tuple[Config, str | None]:
    if path is not None:
        return load_config(path), path
    if DEFAULT_CONFIG_PATH.is_file():
        return load_config(DEFAULT_CONFIG_PATH), str(DEFAULT_CONFIG_PATH)
    return default_config(), None


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.admin.api import token_problems  # aiohttp: only for the commands that need it

    try:
        config = load_config(args.config)
        problems = tls_problems(config) + log_problems(config) + token_problems(config)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        print(f"{args.config}: {len(exc.errors)} error(s)", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.config}: ok")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.admin.api import token_problems
    from proxy.app import run_proxy

    try:
        config, path = resolve_config(args.config)
        problems = tls_problems(config) + log_problems(config) + token_problems(config)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        print(f"turnout: bad config {args.config or DEFAULT_CONFIG_PATH}:", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return EXIT_USAGE
    if path is None:
        print("turnout: no config file given and config/turnout.yaml not found;")
        print("using the built-in default:")
        print(DEFAULT_CONFIG_YAML.rstrip())
    else:
        print(f"turnout: using config {path}")
    if args.workers < 1:
        print("turnout: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    return run_proxy(
        config,
        path,
        takeover=args.takeover,
        handover_path=args.takeover_socket,
        workers=args.workers,
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from proxy.procs.worker import run_worker

    return run_worker(args.index, args.workers, args.listen_fd, args.link_fd)


def cmd_upstream(args: argparse.Namespace) -> int:
    from proxy.tools.sample import SampleSettings, run

    if not 0.0 <= args.error_rate <= 1.0:
        print("turnout upstream: --error-rate must be within 0..1", file=sys.stderr)
        return EXIT_USAGE
    settings = SampleSettings(
        name=args.name,
        error_rate=args.error_rate,
        latency=args.latency,
        error_status=args.error_status,
    )
    try:
        run(settings, args.host, args.port)
    except OSError as exc:
        print(f"turnout upstream: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.tools.demo import run_demo

    return run_demo(bad_green=args.bad_green, duration=args.duration, fleet=args.fleet)


COMMANDS = {
    "run": cmd_run,
    "check": cmd_check,
    "upstream": cmd_upstream,
    "demo": cmd_demo,
    "worker": cmd_worker,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func = COMMANDS.get(args.command) or args.func
    try:
        code = int(func(args))
        sys.stdout.flush()  # here, where a reader that left can still be told apart
        return code
    except KeyboardInterrupt:
        return EXIT_RUNTIME
    except BrokenPipeError:
        # The reader stopped early (`turnout status | head`): not an error of ours, and the
        # rest of the output must not be flushed again at exit onto the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
