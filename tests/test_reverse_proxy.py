"""Network exposure (issue 7.6): hospitals reach the Fleet API through nginx and nothing else.

Flower 1.41's SuperLink serves its Fleet, Control and Runtime APIs as protobuf over HTTP on one
port, and the open-source Control API has no authentication. ``deploy/nginx/
fedpath-superlink.conf`` is the reverse proxy a coordinator puts in front of it; this module
runs that very file (only its addresses and file paths rewritten) with Debian's nginx in front
of a real TLS + node-auth SuperLink on loopback, and shows:

* two registered SuperNodes that dial only the proxy complete a 2-round run;
* ``flwr ls`` / ``flwr supernode register`` / ``flwr run`` pointed at the proxy are refused
  while the same commands against the SuperLink itself work, and raw requests for every other
  API, FastAPI's docs, encoded ``../`` tricks and non-POST methods get nginx's 403;
* (issue 7.4 in deployment form) every request body the SuperNodes sent, captured by nginx
  (``client_body_in_file_only``), holds only allow-listed content (``tests/egress.py``).

nginx must be installed (``scripts/test.sh`` installs Debian's package when run as root); in CI
a missing nginx is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedpath.common.flower_env import free_port
from fedpath.deploy.local_network import LocalNetwork
from fedpath.server.flwr_cli import FlwrCli, NetworkError
from fedpath.server.security import CertificateFiles, create_certificates, create_node_keys
from fedpath.synthetic.site import SyntheticSiteSpec
from tests.egress import EgressPolicy, check_fleet_requests, write_identifiable_site

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
PROXY_CONF = ROOT / "deploy" / "nginx" / "fedpath-superlink.conf"
SPEC = SyntheticSiteSpec(n_slides=10, feature_dim=16, patches=(10, 30))
FLEET_METHODS = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}


def nginx_binary() -> str:
    """Debian's nginx; a failure where ``scripts/setup.sh --test-tools`` installs it (CI, root)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if found:
        return found
    message = "nginx is not installed: `bash scripts/setup.sh --test-tools` (as root) or apt-get"
    if os.environ.get("CI") or (os.geteuid() == 0 and shutil.which("apt-get")):
        pytest.fail(message)
    pytest.skip(message)


def _replace_once(text: str, old: str, new: str) -> str:
    """Rewrite one line of the deploy file; fail loudly if the file no longer has it."""
    assert text.count(old) == 1, f"{PROXY_CONF.name} no longer contains {old!r} exactly once"
    return text.replace(old, new)


def render_proxy(
    workdir: Path, *, listen: int, superlink_port: int, pki: Path, capture: bool
) -> Path:
    """The deploy file with loopback addresses and this test's paths, plus a main nginx.conf
    that keeps every file nginx writes (pid, logs, temp files) under ``workdir`` (no root)."""
    text = PROXY_CONF.read_text(encoding="utf-8")
    text = _replace_once(text, "listen 443 ssl;", f"listen 127.0.0.1:{listen} ssl;")
    text = _replace_once(text, "server 127.0.0.1:9092;", f"server 127.0.0.1:{superlink_port};")
    text, n = re.subn(
        r"^(\s*[a-z_]+\s+)/etc/fedpath/pki/", rf"\g<1>{pki.resolve()}/", text, flags=re.M
    )
    assert n == 3, "the certificate, key and CA directives"
    text = _replace_once(
        text,
        "access_log /var/log/nginx/fedpath-superlink.access.log;",
        f"access_log {workdir}/access.log fedpath;",
    )
    if capture:  # keep every request body: the data-egress check reads what left each site
        text = _replace_once(
            text,
            "    server_tokens off;\n",
            "    server_tokens off;\n"
            "    client_body_in_file_only on;\n"
            f"    client_body_temp_path {workdir}/bodies;\n",
        )
    (workdir / "fedpath-superlink.conf").write_text(text, encoding="utf-8")
    temp = workdir / "temp"
    temp.mkdir(parents=True, exist_ok=True)
    # As root nginx's workers would run as nobody, who cannot enter pytest's 0700 temp dirs.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    main = f"""{user}daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    log_format fedpath '$request_method $uri $status $request_body_file';
    include {workdir}/fedpath-superlink.conf;
}}
"""
    conf = workdir / "nginx.conf"
    conf.write_text(main, encoding="utf-8")
    return conf


@contextlib.contextmanager
def running_nginx(binary: str, conf: Path, port: int, timeout: float = 30.0) -> Iterator[None]:
    """``nginx -t``, then nginx in the foreground until the block ends (its group is stopped)."""
    prefix = conf.parent
    check = subprocess.run(
        [binary, "-t", "-p", f"{prefix}/", "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, f"nginx -t rejects the deploy config:\n{check.stderr}"
    log = open(prefix / "nginx.out", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [binary, "-p", f"{prefix}/", "-c", str(conf)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None, (prefix / "nginx.out").read_text()
            assert time.monotonic() < deadline, "nginx did not open its port"
            time.sleep(0.1)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


@dataclass
class Proxied:
    """A finished run through the proxy, with the proxy and the SuperLink still running."""

    workdir: Path
    net: LocalNetwork
    certs: CertificateFiles
    proxy: str
    status: str
    sites: dict[str, Path]

    def cli(self, address: str, name: str) -> FlwrCli:
        """A coordinator's ``flwr`` with its own FLWR_HOME, pointed at ``address``."""
        cli = FlwrCli(self.workdir / f"flwr-home-{name}", address, self.certs.ca_cert)
        cli.write_connection()
        return cli

    def access_log(self) -> list[tuple[str, str, int, str]]:
        lines = (self.workdir / "proxy" / "access.log").read_text().splitlines()
        return [(m, u, int(s), f) for m, u, s, f in (line.split(" ", 3) for line in lines)]


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    binary = nginx_binary()
    work = tmp_path_factory.mktemp("proxy-e2e")
    sites = {
        f"site_{n}": write_identifiable_site(work / f"hospital-{n}-private-data", SPEC, seed=i)
        for i, n in enumerate("ab")
    }
    certs = create_certificates(work / "pki")
    pairs = create_node_keys(work / "keys", list(sites))
    net = LocalNetwork(
        work / "net",
        tls_ca=certs.ca_cert,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        node_auth=True,
    )
    proxy_port = free_port()
    proxy_dir = work / "proxy"
    proxy_dir.mkdir()
    conf = render_proxy(
        proxy_dir,
        listen=proxy_port,
        superlink_port=net.superlink_port,
        pki=work / "pki",
        capture=True,
    )
    proxy = f"127.0.0.1:{proxy_port}"
    with net, running_nginx(binary, conf, proxy_port):
        net.start_superlink()
        for pair in pairs:  # the coordinator registers keys on its own host, not via the proxy
            answer = net.flwr("supernode", "register", str(pair.public_key), "local")
            assert answer.get("success"), answer
        for pair in pairs:
            net.start_supernode(
                pair.site, sites[pair.site], private_key=pair.private_key, superlink=proxy
            )
        deadline = time.monotonic() + 120
        while net.connected_nodes() < len(pairs):
            assert time.monotonic() < deadline, dict(net.logs())
            time.sleep(1.0)
        run_id = net.submit(
            ROOT,
            {
                "num-server-rounds": 2,
                "local-epochs": 1,
                "min-sites": 2,
                "runs-dir": str(work / "runs"),
                "run-name": "proxied",
                "round-timeout": 300.0,
            },
        )
        status = net.wait_for_run(run_id, timeout=600)
        yield Proxied(work, net, certs, proxy, status, sites)


def test_supernodes_complete_a_run_through_the_proxy(proxied: Proxied) -> None:
    assert proxied.status == "finished:completed", dict(proxied.net.logs())
    final = json.loads((proxied.workdir / "runs" / "proxied" / "final.json").read_text())
    assert final["status"] == "completed" and final["rounds_completed"] == 2
    assert set(final["test"]) == set(proxied.sites)
    # The nodes only knew the proxy's address, and the proxy carried their Fleet traffic.
    for name in proxied.sites:
        argv = proxied.net.processes[f"node-{name}"].process.args
        assert argv[argv.index("--superlink") + 1] == proxied.proxy
    served = {(uri, status) for _, uri, status, _ in proxied.access_log()}
    for method in ("activate-node", "pull-messages", "push-messages", "push-object", "get-fab"):
        assert (f"/v1/fleet/{method}", 200) in served


def test_flwr_control_commands_through_the_proxy_are_refused(proxied: Proxied) -> None:
    direct = proxied.cli(proxied.net.address, "direct")
    assert direct.flwr("ls", "local").get("success") is True, "the SuperLink itself answers"
    via_proxy = proxied.cli(proxied.proxy, "proxy")
    rogue = create_node_keys(proxied.workdir / "rogue", ["rogue"])[0]
    for args in (
        ("ls", "local"),
        ("supernode", "list", "local"),
        ("supernode", "register", str(rogue.public_key), "local"),
        ("stop", "1", "local"),
    ):
        try:
            answer = via_proxy.flwr(*args, timeout=60)
        except NetworkError as exc:  # no JSON answer at all is a refusal too
            answer = {"success": False, "error-message": str(exc)}
        assert answer.get("success") is not True, f"flwr {' '.join(args)} went through: {answer}"
    with pytest.raises(NetworkError, match=r"flwr run failed|gave no JSON"):
        via_proxy.submit(ROOT, {"num-server-rounds": 1})
    runs = direct.flwr("ls", "local").get("runs") or []
    assert len(runs) == 1, "no run was started through the proxy"
    nodes = direct.flwr("supernode", "list", "local").get("nodes") or []
    assert len(nodes) == len(proxied.sites), "the rogue key was not registered"
    refused = [(m, u) for m, u, s, _ in proxied.access_log() if u.startswith("/v1/control/")]
    assert refused and all(
        s == 403 for _, u, s, _ in proxied.access_log() if u.startswith("/v1/control/")
    )


def _request(address: str, ca: Path, method: str, target: str) -> tuple[int, bytes]:
    """One raw HTTPS request; the request target is sent exactly as given (no normalising)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "localhost")
        for key, value in PROTOBUF.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


REFUSED_TARGETS = (
    "/v1/control/list-runs",
    "/v1/control/start-run",
    "/v1/control/register-node",
    "/v1/control/list-nodes",
    "/v1/runtime/get-run",
    "/v1/runtime/pull-messages",
    "/docs",
    "/openapi.json",
    "/health",
    "/",
    "/v1/fleet/",
    "/v1/fleet/unknown-method",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/..%2fcontrol%2flist-runs",
    "/v1/fleet/pull-messages/../../control/list-runs",
    "/v1/fleet/pull-messages%2f..%2f..%2fcontrol%2flist-runs",
    "//v1/control/list-runs",
    "/v1//control/list-runs",
    "/V1/CONTROL/LIST-RUNS",
    "/v1/fleet/pull-messages/",
    "/v1/fleet/pull-messages;/../../control/list-runs",
)


def test_raw_requests_for_anything_but_the_fleet_api_are_refused(proxied: Proxied) -> None:
    ca = proxied.certs.ca_cert
    # The probe means something: straight to the SuperLink, the Control API answers.
    status, _ = _request(proxied.net.address, ca, "POST", "/v1/control/list-runs")
    assert status == 200
    for target in REFUSED_TARGETS:
        status, body = _request(proxied.proxy, ca, "POST", target)
        assert status in (400, 403), f"{target}: {status} {body[:200]!r}"
    for method in ("GET", "PUT", "DELETE", "OPTIONS", "PATCH"):
        status, _ = _request(proxied.proxy, ca, method, "/v1/fleet/pull-messages")
        assert status == 403, method
    # Each Fleet method is forwarded: the SuperLink's own node-auth check refuses the unsigned
    # probe with 401 (nginx would have said 403).
    for name in FLEET_METHODS:
        status, body = _request(proxied.proxy, ca, "POST", f"/v1/fleet/{name}")
        assert status == 401 and b"only the Flower Fleet API" not in body, (name, status, body)
    assert set(FLEET_METHODS) == set(
        re.search(r"\^/v1/fleet/\(([^)]*)\)\$", PROXY_CONF.read_text()).group(1).split("|")
    )


def test_the_fleet_allow_list_matches_flowers_fleet_client() -> None:
    """A Flower upgrade that adds a Fleet method must show up here, not as stuck nodes."""
    import inspect

    from flwr.supernode import fleet_http_client

    paths = set(re.findall(r'path="/v1/fleet/([a-z-]+)"', inspect.getsource(fleet_http_client)))
    assert paths == set(FLEET_METHODS)


def test_everything_the_supernodes_sent_through_the_proxy_is_allow_listed(
    proxied: Proxied,
) -> None:
    """Issue 7.4 in deployment form: the bytes on the wire, not the ClientApp's return value."""
    from fedpath.server.config import RunConfig
    from fedpath.server.federated_run import initial_arrays

    requests = [
        (uri, Path(body_file).read_bytes())
        for method, uri, status, body_file in proxied.access_log()
        if uri.startswith("/v1/fleet/") and body_file != "-" and status == 200
    ]
    recorded = json.loads((proxied.workdir / "runs" / "proxied" / "config.json").read_text())
    cfg = RunConfig.from_run_config(recorded["run_config"])  # the model the server really sent
    arrays = initial_arrays(cfg, SPEC.feature_dim)
    policy = EgressPolicy.for_run(arrays, proxied.sites.values(), ("normal", "tumour"))
    report = check_fleet_requests(requests, policy)
    assert report.violations == []
    # Not vacuous: the query, two rounds of train and evaluate, and the final test, per site.
    assert report.replies.get("query") == 2 and report.replies.get("train") == 4
    assert report.replies.get("evaluate", 0) >= 6 and "error" not in report.replies
    assert report.objects > 10 and report.bytes_checked > 10_000
