"""Deployment files: the Grafana dashboard asks only for series Turnout exports, the Kubernetes
example embeds a valid configuration and shuts down within its grace period, and the Dockerfile
builds from files that exist and runs a command that works."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import fnmatch
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import HOST, ProxyFactory, SampleFactory, proxy_config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers.processes import ADMIN_API, ProxyProcess
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import build_parser
from proxy.config import Config, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
KUBERNETES = ROOT / "deploy" / "kubernetes-sidecar.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGE_CONFIG = ROOT / "config" / "turnout.yaml"

# Prometheus attaches these to every series it scrapes; Turnout does not export them.
TARGET_LABELS = frozenset({"job", "instance"})

Exported = dict[str, list[dict[str, str]]]  # sample name -> the label sets of its samples


# --- what Turnout exports ------------------------------------------------------------------


@pytest.fixture
async def exported(sample: SampleFactory, make_proxy: ProxyFactory, tmp_path: Path) -> Exported:
    """Every sample of a scrape of a real proxy that answered 2xx and 5xx and retried, and of
    a `turnout run --workers 2` supervisor (what only a supervisor exports)."""
    blue = await sample("blue")
    green = await sample("green")
    data = proxy_config([blue.url], [green.url], split=50)
    proxy = await make_proxy(data)
    base = f"http://{HOST}:{proxy.port}"
    async with aiohttp.ClientSession() as client:
        for path in ("/", "/", "/", "/", "/status/503"):
            async with client.get(base + path) as resp:
                await resp.read()
    body, content_type = proxy.metrics.exposition()
    assert content_type.startswith("text/plain")
    samples: Exported = {}
    async with (
        supervisor(data, tmp_path) as admin,
        aiohttp.ClientSession() as client,
        client.get(admin + "/metrics") as resp,
    ):
        scraped = await resp.text()
    for text in (body.decode(), scraped):
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append(dict(s.labels))
    # The traffic above must have produced what the checks below rely on.
    assert any(labels.get("code") == "503" for labels in samples["turnout_requests_total"])
    assert "turnout_retries_total" in samples
    assert "turnout_worker_restarts_total" in samples
    return samples


@contextlib.asynccontextmanager
async def supervisor(data: dict[str, Any], tmp_path: Path) -> AsyncIterator[str]:
    """`turnout run --workers 2` on ports 0: its admin API's address."""
    path = tmp_path / "workers.yaml"
    path.write_text(yaml.safe_dump({**data, "admin": {"host": HOST, "port": 0}}))
    env = {k: v for k, v in os.environ.items() if k != "TURNOUT_ADMIN_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "proxy", "run", "-c", str(path), "--workers", "2"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    process = ProxyProcess(proc, tmp_path / "workers.log")
    try:
        process.admin_port = int((await process.wait_line(ADMIN_API))[2])
        yield process.admin
    finally:
        if process.alive:
            process.signal(signal.SIGTERM)
            try:
                await process.exit_code(30)
            except TimeoutError:
                proc.kill()
        await proc.wait()
        await process._reader


# --- reading PromQL ----------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"(?<![\w:$])(turnout_[A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_]\w*)\s*\)\s*$", re.S)
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


@dataclass(frozen=True)
class Selector:
    metric: str
    start: int
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)


def masked(expr: str) -> str:
    """`expr` with the insides of string literals blanked, positions unchanged."""
    return _STRING.sub(lambda m: m.group()[0] + " " * (len(m.group()) - 2) + m.group()[0], expr)


def selectors(expr: str) -> list[Selector]:
    found = []
    for m in _SELECTOR.finditer(masked(expr)):
        braces = expr[m.start(2) : m.end(2)] if m.group(2) else ""
        matchers = tuple((lab, op, json.loads(v)) for lab, op, v in _MATCHER.findall(braces))
        found.append(Selector(m.group(1), m.start(), matchers))
    return found


def closing(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def opening(text: str, close_at: int) -> int:
    depth = 0
    for i in range(close_at, -1, -1):
        depth += {")": 1, "(": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def groupings(expr: str) -> Iterator[tuple[str, list[str], range]]:
    """(keyword, labels, span of the expression the labels apply to) for each grouping clause:
    an aggregation's argument for by/without, the whole expression for vector matching."""
    text = masked(expr)
    for m in _GROUPING.finditer(text):
        labels = [label.strip() for label in m.group(2).split(",") if label.strip()]
        keyword, span = m.group(1), range(len(text))
        if keyword in ("by", "without"):
            rest = text[m.end() :]
            after = m.end() + len(rest) - len(rest.lstrip())
            before = len(text[: m.start()].rstrip()) - 1
            if after < len(text) and text[after] == "(":  # sum by (pool) (x)
                span = range(after, closing(text, after) + 1)
            else:  # sum (x) by (pool)
                assert text[before] == ")", f"cannot read the aggregation in {expr!r}"
                span = range(opening(text, before), before + 1)
        yield keyword, labels, span


def label_names(exported: Exported, metric: str) -> set[str]:
    return {name for labels in exported[metric] for name in labels}


@dataclass(frozen=True)
class Query:
    where: str
    expr: str
    legend: str = ""


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every PromQL expression of panels, rows and annotations, and every variable query."""
    queries: list[Query] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            here = f"{where}/{node.get('title') or node.get('name') or ''}".rstrip("/")
            if isinstance(node.get("expr"), str):
                queries.append(Query(here, node["expr"], str(node.get("legendFormat", ""))))
            for key, value in node.items():
                if key != "templating":
                    walk(value, here)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(dashboard, "")
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            text = query["query"] if isinstance(query, dict) else query
            queries.append(Query(f"variable {var['name']}", text))
            assert var.get("definition", text) == text, var["name"]
    return queries


def check_query(query: Query, exported: Exported) -> list[str]:
    """Problems of one query against the exported samples: unknown metrics, unknown labels,
    equality matchers no exported sample satisfies, legend labels no metric carries."""
    problems: list[str] = []
    expr = query.expr
    label_values = _LABEL_VALUES.match(expr)
    if label_values:
        expr = label_values.group(1)
    found = selectors(expr)
    metrics = {s.metric for s in found}
    if not metrics:
        problems.append("names no turnout_ metric")
    unknown = metrics - exported.keys()
    problems += [f"{m} is not exported" for m in sorted(unknown)]
    known = sorted(metrics - unknown)

    def check_label(label: str, over: list[str]) -> None:
        for metric in over:
            if label not in TARGET_LABELS and label not in label_names(exported, metric):
                problems.append(f"{metric} has no label {label!r}")

    for s in found:
        if s.metric in unknown:
            continue
        for label, op, value in s.matchers:
            check_label(label, [s.metric])
            if op in ("=", "=~") and "$" not in value and label not in TARGET_LABELS:
                pattern = re.compile(value if op == "=~" else re.escape(value))
                values = {labels.get(label, "") for labels in exported[s.metric]}
                if not any(pattern.fullmatch(v) for v in values):
                    problems.append(f"{s.metric}{{{label}{op}{value!r}}} matches no sample")
    for keyword, labels, span in groupings(expr):
        scoped = sorted({s.metric for s in found if s.start in span} - unknown)
        if keyword.startswith("group_"):
            for label in labels:
                if not any(label in label_names(exported, m) for m in known):
                    problems.append(f"{keyword}({label}) is on no metric of the query")
        else:
            for label in labels:
                check_label(label, scoped)
    if label_values:
        check_label(label_values.group(2), known)
    for label in _LEGEND_LABEL.findall(query.legend):
        if label not in TARGET_LABELS and not any(label in label_names(exported, m) for m in known):
            problems.append(f"legend label {label!r} is on no metric of the query")
    return problems


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_promql_reader_sees_names_labels_and_scopes() -> None:
    expr = (
        'sum by (pool, le) (rate(turnout_a_bucket{code=~"5..", x="turnout_not_a_metric"}[1m]))'
        " / on (pool) sum(turnout_b) without (reason)"
    )
    found = selectors(expr)
    assert [s.metric for s in found] == ["turnout_a_bucket", "turnout_b"]
    assert found[0].matchers == (("code", "=~", "5.."), ("x", "=", "turnout_not_a_metric"))
    scopes = {
        keyword: {s.metric for s in found if s.start in span}
        for keyword, _, span in groupings(expr)
    }
    assert scopes == {
        "by": {"turnout_a_bucket"},
        "on": {"turnout_a_bucket", "turnout_b"},
        "without": {"turnout_b"},
    }


def test_query_check_catches_wrong_names_labels_and_values() -> None:
    exported: Exported = {
        "turnout_shed_total": [{"pool": "blue", "reason": "queue_full"}],
        "turnout_rollout_step": [{}],
    }
    good = Query(
        "ok", 'sum by (reason) (turnout_shed_total{pool="blue"})', "{{reason}} {{instance}}"
    )
    assert check_query(good, exported) == []
    assert check_query(Query("x", "turnout_shed"), exported) == ["turnout_shed is not exported"]
    assert check_query(Query("x", "sum by (code) (turnout_shed_total)"), exported) == [
        "turnout_shed_total has no label 'code'"
    ]
    assert check_query(Query("x", 'turnout_shed_total{reason="queue-full"}'), exported) == [
        "turnout_shed_total{reason='queue-full'} matches no sample"
    ]
    assert check_query(Query("x", "turnout_rollout_step", "{{pool}}"), exported) == [
        "legend label 'pool' is on no metric of the query"
    ]
    assert check_query(Query("x", "label_values(turnout_rollout_step, pool)"), exported) == [
        "turnout_rollout_step has no label 'pool'"
    ]


async def test_dashboard_asks_only_for_exported_series(exported: Exported) -> None:
    queries = dashboard_queries(load_dashboard())
    assert len(queries) >= 20
    problems = [f"{q.where}: {q.expr}: {p}" for q in queries for p in check_query(q, exported)]
    assert problems == []


async def test_dashboard_shows_every_exported_family(exported: Exported) -> None:
    shown = {s.metric for q in dashboard_queries(load_dashboard()) for s in selectors(q.expr)}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exported}
    missing = {f for f in families if not any(m.startswith(f) for m in shown)}
    assert missing == set()


def test_dashboard_covers_the_operator_questions() -> None:
    exprs = [q.expr for q in dashboard_queries(load_dashboard())]

    def some(pattern: str) -> bool:
        return any(re.search(pattern, e, re.S) for e in exprs)

    assert some(r"by \(pool\) \(turnout_split_percent")
    assert some(r"sum by \(pool\) \(rate\(turnout_requests_total")
    assert some(r'by \(pool\).*turnout_requests_total\{[^}]*code=~"5\.\.".*/')
    assert some(r"histogram_quantile\(0\.99, sum by \(pool, le\) \(rate\(turnout_request_duration_")
    assert some(r'turnout_upstream_state\{[^}]*state=~"breaker_\.\*"')
    assert some(r"by \([^)]*reason[^)]*\) \(rate\(turnout_shed_total")
    assert some(r"rate\(turnout_retries_total")
    assert some(r"rate\(turnout_rescued_total")
    # A panel per pool of every attempt: a candidate's shielded failures are not idle.
    for pool in ("blue", "green"):
        attempts = rf'turnout_upstream_attempts_total\{{[^}}]*pool="{pool}"'
        assert some(r"by \(upstream, outcome\).*" + attempts)
    assert some(r"by \(state\) \(turnout_rollout_state")
    assert some(r"turnout_rollout_step")
    assert some(r"turnout_rollback_seconds_(bucket|sum|count)")


def test_dashboard_is_importable() -> None:
    dash = load_dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"]
    assert dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    source = variables["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        assert pos["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    # Every $variable a query uses is defined (Grafana's own $__ variables aside).
    for query in dashboard_queries(dash):
        for name in re.findall(r"\$(\w+)", query.expr):
            assert name.startswith("__") or name in variables, (query.where, name)


# --- Kubernetes ----------------------------------------------------------------------------


def kubernetes_documents() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d is not None]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    assert {"ConfigMap", "Deployment", "Service", "Secret"} <= by_kind.keys()
    return by_kind


ADMIN_TLS_FILES = ("/etc/turnout-tls/tls.crt", "/etc/turnout-tls/tls.key")


@functools.cache
def stand_in_pair() -> tuple[str, str]:
    """A certificate and key where the pod mounts the Secret's, made once per run."""
    folder = Path(tempfile.mkdtemp(prefix="turnout-k8s-"))
    atexit.register(shutil.rmtree, folder, True)
    return self_signed(folder)


def embedded_text(docs: dict[str, dict[str, Any]]) -> str:
    """The ConfigMap's turnout.yaml, its admin TLS files (the Secret's, in the pod) stood in
    for by files made here: the loader checks that they exist."""
    text: str = docs["ConfigMap"]["data"]["turnout.yaml"]
    for mounted, here in zip(ADMIN_TLS_FILES, stand_in_pair(), strict=True):
        assert mounted in text
        text = text.replace(mounted, here)
    return text


def embedded_config(docs: dict[str, dict[str, Any]]) -> Config:
    return parse_config(yaml.safe_load(embedded_text(docs)))


def containers(docs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def turnout_container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return containers(docs)["turnout"]


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    return int(named[port])


def pre_stop_sleep(container: dict[str, Any]) -> float:
    hook = container["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    if command[:2] == ["sh", "-c"] or command[:2] == ["/bin/sh", "-c"]:
        command = shlex.split(command[2])
    assert command[0] in ("sleep", "/bin/sleep"), command
    assert len(command) == 2, command
    return float(command[1])


def test_kubernetes_configmap_holds_a_valid_config(tmp_path: Path) -> None:
    docs = kubernetes_documents()
    config = embedded_config(docs)
    # The file the pod reads goes through turnout's own loader (YAML 1.2 booleans) as well.
    path = tmp_path / "turnout.yaml"
    path.write_text(embedded_text(docs))
    assert load_config(path) == config
    for pool in (config.pools.blue, config.pools.green):
        assert pool.upstreams
        for upstream in pool.upstreams:
            assert upstream.host == "127.0.0.1", "a sidecar reaches its app on loopback"


def test_kubernetes_sidecar_runs_the_mounted_config() -> None:
    docs = kubernetes_documents()
    config = embedded_config(docs)
    turnout = turnout_container(docs)
    assert turnout["image"] == "turnout:latest"
    assert turnout["args"] == ["run", "-c", "/etc/turnout/turnout.yaml"]
    build_parser().parse_args(turnout["args"])
    mount = next(m for m in turnout["volumeMounts"] if m["mountPath"] == "/etc/turnout")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    ports = {p["containerPort"] for p in turnout["ports"]}
    assert {config.listen.port, config.admin.port} <= ports == {8080, 9901}
    # The app containers listen on the ports the pools point at.
    pool_ports = {u.port for p in (config.pools.blue, config.pools.green) for u in p.upstreams}
    app_commands = " ".join(
        " ".join(c.get("command", []) + c.get("args", []))
        for name, c in containers(docs).items()
        if name != "turnout"
    )
    for port in pool_ports:
        assert f"--port {port}" in app_commands


def test_kubernetes_probes_reach_the_admin_api() -> None:
    docs = kubernetes_documents()
    config = embedded_config(docs)
    turnout = turnout_container(docs)
    ready = turnout["readinessProbe"]["httpGet"]
    live = turnout["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert live["path"] == "/healthz"
    assert port_number(turnout, ready["port"]) == config.admin.port
    assert port_number(turnout, live["port"]) == config.admin.port
    # The kubelet probes from outside the pod: admin must listen beyond loopback, which
    # Turnout allows only with a token, here from the Secret.
    assert config.admin.host == "0.0.0.0"
    env = {e["name"]: e for e in turnout["env"]}
    ref = env[config.admin.token_env]["valueFrom"]["secretKeyRef"]
    secret = docs["Secret"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in {**secret.get("stringData", {}), **secret.get("data", {})}


def self_signed(tmp_path: Path) -> tuple[str, str]:
    """What the sidecar file's openssl command makes: a self-signed P-256 certificate for
    localhost and 127.0.0.1, its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "turnout-admin")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


async def test_kubernetes_admin_api_speaks_tls_off_loopback(
    sample: SampleFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Off loopback the token crosses the pod network: the admin API serves TLS from files
    of the Secret, the probes use HTTPS, and the client in the pod reaches it as set up."""
    docs = kubernetes_documents()
    config = embedded_config(docs)
    turnout = turnout_container(docs)
    tls = yaml.safe_load(docs["ConfigMap"]["data"]["turnout.yaml"])["admin"]["tls"]
    assert (tls["cert"], tls["key"]) == ADMIN_TLS_FILES
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = docs["Secret"]
    for path in ADMIN_TLS_FILES:
        mount = next(m for m in turnout["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        source = volumes[mount["name"]]["secret"]
        assert source["secretName"] == secret["metadata"]["name"]
        items = {i["path"]: i["key"] for i in source["items"]}
        assert items[path.removeprefix(mount["mountPath"] + "/")] in secret["stringData"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert turnout[probe]["httpGet"]["scheme"] == "HTTPS"
    env = {e["name"]: e.get("value") for e in turnout["env"]}
    assert env["TURNOUT_ADMIN"] == f"https://localhost:{config.admin.port}"
    assert env["SSL_CERT_FILE"] == tls["cert"]

    cert, key = self_signed(tmp_path)
    blue = await sample("blue")
    admin = {"host": HOST, "port": 0, "tls": {"cert": cert, "key": key}}
    proxy = await make_proxy(proxy_config([blue.url], [blue.url], admin=admin))
    await proxy.start_admin()
    client_env = {
        **os.environ,
        "TURNOUT_ADMIN": f"https://localhost:{proxy.admin_port}",
        "SSL_CERT_FILE": cert,
    }
    client_env.pop("TURNOUT_ADMIN_TOKEN", None)
    done = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "status",
        env=client_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(done.communicate(), 30)
    assert (done.returncode, err.decode()) == (0, "")
    assert "stable:" in out.decode()


def test_deploy_files_name_their_own_folder() -> None:
    for path in (KUBERNETES, ROOT / "README.md"):
        text = path.read_text()
        for name in ("kubernetes-sidecar.yaml", "grafana-dashboard.json"):
            assert f"config/{name}" not in text, (path.name, name)


def test_kubernetes_grace_period_covers_pre_stop_and_drain() -> None:
    docs = kubernetes_documents()
    config = embedded_config(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    turnout = turnout_container(docs)
    pre_stop = pre_stop_sleep(turnout)
    assert pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.drain.timeout
    # The apps get SIGTERM with Turnout: they keep answering until Turnout has drained.
    for name, container in containers(docs).items():
        if name != "turnout":
            assert pre_stop + config.drain.timeout <= pre_stop_sleep(container), name
            assert pre_stop_sleep(container) < pod["terminationGracePeriodSeconds"], name


def test_kubernetes_pod_is_locked_down_and_sized() -> None:
    docs = kubernetes_documents()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    for name, container in containers(docs).items():
        context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert context["runAsNonRoot"] is True, name
        # The image's USER is not numeric, so the kubelet needs runAsUser to verify non-root.
        assert isinstance(context["runAsUser"], int), name
        assert context["runAsUser"] > 0, name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        resources = container["resources"]
        assert resources["requests"]["cpu"], name
        assert resources["requests"]["memory"], name
        assert resources["limits"]["memory"], name


def test_kubernetes_service_reaches_the_proxy_port() -> None:
    docs = kubernetes_documents()
    config = embedded_config(docs)
    service = docs["Service"]["spec"]
    template = docs["Deployment"]["spec"]["template"]
    selector = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["selector"].items() <= template["metadata"]["labels"].items()
    assert selector.items() <= template["metadata"]["labels"].items()
    turnout = turnout_container(docs)
    targets = {port_number(turnout, p["targetPort"]) for p in service["ports"]}
    assert targets == {config.listen.port}, "only the proxy port; admin stays in the pod"


# --- Dockerfile --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile() -> list[Instruction]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append(Instruction(keyword.upper(), args.strip()))
    return out


def only(keyword: str) -> Instruction:
    found = [i for i in dockerfile() if i.keyword == keyword]
    assert len(found) == 1, f"one {keyword} expected, found {len(found)}"
    return found[0]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), args
    assert all(isinstance(v, str) for v in value), args
    return value


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    out = []
    for ins in dockerfile():
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins.args)
        if any(w.startswith("--from=") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        if words and words[0].startswith("["):
            words = exec_form(" ".join(words))
        out.append((words[:-1], words[-1]))
    return out


def ignored(path: str) -> bool:
    for pattern in DOCKERIGNORE.read_text().splitlines():
        pattern = pattern.strip().rstrip("/")
        if not pattern or pattern.startswith("#"):
            continue
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            return True
    return False


def test_dockerfile_copies_files_that_exist() -> None:
    found = copies()
    assert found
    sources = [src for srcs, _ in found for src in srcs]
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not ignored(src), f"{src} is excluded by .dockerignore"
    # Building the wheel in the image needs the project file, its readme, setup.py (which
    # compiles the data path) and the package.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"pyproject.toml", "setup.py", project["readme"], "proxy"} <= set(sources)


def test_dockerfile_runs_turnout_as_non_root_with_its_ports() -> None:
    config = load_config(IMAGE_CONFIG)
    instructions = dockerfile()
    exposed = {
        int(p.split("/")[0]) for i in instructions if i.keyword == "EXPOSE" for p in i.args.split()
    }
    assert {config.listen.port, config.admin.port} <= exposed
    users = [i.args.split(":")[0] for i in instructions if i.keyword == "USER"]
    assert users
    assert users[-1] not in ("root", "0")
    healthcheck = only("HEALTHCHECK")
    assert not healthcheck.args.upper().startswith("NONE")
    assert str(config.listen.port) in healthcheck.args or str(config.admin.port) in healthcheck.args
    entrypoint = exec_form(only("ENTRYPOINT").args)
    cmd = exec_form(only("CMD").args)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[0] in scripts
    args = build_parser().parse_args(entrypoint[1:] + cmd)
    assert args.command == "run"
    # The image's config file is config/turnout.yaml.
    destinations = {
        dest for srcs, dest in copies() if srcs == [IMAGE_CONFIG.relative_to(ROOT).as_posix()]
    }
    assert args.config in destinations


def test_image_config_passes_turnout_check() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", "config/turnout.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
