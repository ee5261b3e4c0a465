"""Coordinator and node commands say what is true (issue 20, points 7-13).

Fast tests run the CLI through ``fedpath.deploy.cli.main`` against real sockets, real certificate
files and real locks; the slow ones start one real TLS + node-auth SuperLink (or reuse the
loopback network of tests/test_cli_coordinator.py) and run the commands against it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import shlex
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedpath.common.flower_env import free_port
from fedpath.deploy.cli import main
from fedpath.server.cli_run_follower import round_line
from fedpath.server.security import (
    Registration,
    create_certificates,
    create_node_keys,
    diagnose_tls,
    read_site_names,
    record_site_names,
)
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

ROOT = Path(__file__).resolve().parents[1]
FEDPATH = str(Path(sys.executable).with_name("fedpath"))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- status: unreachable SuperLink (point 7) -------------------------------------------------


@pytest.mark.slow
def test_status_exits_1_with_one_line_when_the_superlink_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    code = main(
        ["status", "--superlink", f"127.0.0.1:{port}", "--insecure",
         "--flwr-home", str(tmp_path / "home")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1, out
    assert len(_lines(out)) == 1, out
    assert f"cannot reach the SuperLink at 127.0.0.1:{port}" in out
    assert "run id" not in out, "no empty tables for an unreachable SuperLink"


# -- certificates (point 12) -----------------------------------------------------------------


def _self_signed(path: Path, not_before: dt.datetime, not_after: dt.datetime) -> Path:
    """A CA certificate with the given validity (for expired / expiring files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_link_refuses_an_expired_ca_and_warns_loudly_before_expiry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = create_certificates(tmp_path / "pki")
    now = dt.datetime.now(dt.UTC)
    expired = _self_signed(tmp_path / "expired.pem", now - dt.timedelta(days=400),
                           now - dt.timedelta(days=2))  # fmt: skip
    soon = _self_signed(tmp_path / "soon.pem", now - dt.timedelta(days=400),
                        now + dt.timedelta(days=10))  # fmt: skip
    base = ["link", "--state", str(tmp_path / "state"), "--cert", str(pki.server_cert),
            "--key", str(pki.server_key), "--print-only"]  # fmt: skip
    assert main([*base, "--ca", str(expired)]) == 2
    out = capsys.readouterr().out
    assert "refusing to start the SuperLink" in out and "EXPIRED" in out
    assert main([*base, "--ca", str(soon)]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "expires in" in out and str(soon) in out.replace("\n", "")
    assert main([*base, "--ca", str(pki.ca_cert)]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_certs_prints_the_validity_period(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", "--out", str(tmp_path / "pki")]) == 0
    out = capsys.readouterr().out
    today = dt.datetime.now(dt.UTC)
    assert f"valid {(today - dt.timedelta(minutes=10)):%Y-%m-%d} – " in out
    assert "3650 days left" in out or "3649 days left" in out
    assert "days left" in out.split("SuperLink ", 2)[-1]


def _tls_server(cert: Path, key: Path) -> tuple[str, socket.socket]:
    """A TLS listener on loopback presenting ``cert`` (answers handshakes, then closes)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}", listener


def test_a_wrong_or_expired_ca_is_named_as_the_cause(tmp_path: Path) -> None:
    pki = create_certificates(tmp_path / "pki")
    other = create_certificates(tmp_path / "other")
    address, listener = _tls_server(pki.server_cert, pki.server_key)
    try:
        assert diagnose_tls(address, pki.ca_cert) is None
        assert "did not sign" in (diagnose_tls(address, other.ca_cert) or "")
        now = dt.datetime.now(dt.UTC)
        old = _self_signed(tmp_path / "old.pem", now - dt.timedelta(days=9),
                           now - dt.timedelta(days=1))  # fmt: skip
        assert "EXPIRED" in (diagnose_tls(address, old) or "")
    finally:
        listener.close()


# -- a second node on one host (point 13) ----------------------------------------------------


def _node_argv(tmp_path: Path, port: int, *extra: str) -> list[str]:
    data = tmp_path / "site_a"
    if not data.exists():
        write_synthetic_site(data, SyntheticSiteSpec(n_slides=4), seed=0)
    return ["node", "--superlink", "127.0.0.1:9", "--data", str(data), "--port", str(port), *extra]


def test_node_names_a_port_in_use_and_the_port_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code = main(_node_argv(tmp_path, port, "--insecure"))
    out = capsys.readouterr().out
    assert code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in out.replace("\n", " ")
    assert "--port" in out


def test_node_refuses_a_key_another_node_on_this_host_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = create_certificates(tmp_path / "pki")
    pair = create_node_keys(tmp_path / "keys", ["site_a"])[0]
    fd = os.open(pair.private_key, os.O_RDONLY)  # what a running `fedpath node` holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(
            _node_argv(tmp_path, free_port(), "--key", str(pair.private_key),
                       "--ca", str(pki.ca_cert))
        )  # fmt: skip
    finally:
        os.close(fd)
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2
    assert "is already used by another `fedpath node` running on this machine" in out


# -- progress and site names -------------------------------------------------------------------


def test_round_line_shows_sites_loss_and_epsilon_so_far() -> None:
    record = {
        "round": 2,
        "sampled": ["a", "b", "c"],
        "replied": ["a", "b"],
        "failed": {"c": "timed out"},
        "global": {"train_loss": 0.5123, "val_auc": 0.8},
        "privacy": {"a": {"epsilon": 1.5, "delta": 1e-5}, "b": {"epsilon": 2.25, "delta": 1e-5}},
    }
    line = round_line(record, total=5)
    assert line.startswith("round 2/5: 2/3 sites answered, train loss 0.512, val AUC 0.800")
    assert "slide-level ε so far ≤ 2.25" in line and "failed: c" in line


def test_registered_node_ids_are_remembered_per_superlink(tmp_path: Path) -> None:
    pairs = create_node_keys(tmp_path / "keys", ["hospital_a", "hospital_b"])
    record_site_names(
        tmp_path / "home",
        "link:9092",
        [Registration(pairs[0].public_key, 11), Registration(pairs[1].public_key, None, True)],
    )
    names = read_site_names(tmp_path / "home", "link:9092")
    assert {k: v["site"] for k, v in names.items()} == {11: "hospital_a"}
    assert read_site_names(tmp_path / "home", "other:9092") == {}


# -- real SuperLink ----------------------------------------------------------------------------


def _fedpath(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDPATH, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
@pytest.mark.integration
def test_status_register_node_stop_and_timeout_against_a_tls_superlink(tmp_path: Path) -> None:
    """One TLS + node-auth SuperLink: wrong CA named, site names and last seen in status, a
    second `fedpath node` with the same key refused, --timeout says the run goes on, and
    `fedpath stop` stops it."""
    from fedpath.deploy.local_network import LocalNetwork

    pki = create_certificates(tmp_path / "pki")
    other = create_certificates(tmp_path / "other")
    pair = create_node_keys(tmp_path / "keys", ["hospital_a"])[0]
    data = write_synthetic_site(tmp_path / "hospital_a", SyntheticSiteSpec(n_slides=4), seed=0)
    home = str(tmp_path / "home")
    with LocalNetwork(
        tmp_path / "net",
        tls_ca=pki.ca_cert,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        node_auth=True,
    ) as net:
        net.start_superlink()
        conn = ["--superlink", net.address, "--flwr-home", home]
        wrong = _fedpath("keys", "register", *conn, "--ca", str(other.ca_cert),
                         str(pair.public_key))  # fmt: skip
        assert wrong.returncode == 1
        assert f"{other.ca_cert} did not sign" in " ".join(wrong.stdout.split())
        status = _fedpath("status", *conn, "--ca", str(other.ca_cert))
        assert status.returncode == 1 and len(_lines(status.stdout)) == 1, status.stdout
        ok = _fedpath("keys", "register", *conn, "--ca", str(pki.ca_cert), str(pair.public_key))
        assert ok.returncode == 0, ok.stdout
        node = subprocess.Popen(
            [FEDPATH, "node", "--superlink", net.address, "--data", str(data),
             "--key", str(pair.private_key), "--ca", str(pki.ca_cert), "--port", str(free_port())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while net.connected_nodes() < 1:
                assert time.monotonic() < deadline and node.poll() is None
                time.sleep(1)
            second = _fedpath("node", "--superlink", net.address, "--data", str(data),
                              "--key", str(pair.private_key), "--ca", str(pki.ca_cert),
                              "--port", str(free_port()))  # fmt: skip
            assert second.returncode == 2
            assert "already used by another `fedpath node`" in " ".join(second.stdout.split())
            # From another machine the lock cannot help: Flower refuses the node with the words
            # it uses for an unregistered key; only the SuperLink's log tells them apart.
            net.start_supernode("elsewhere", data, private_key=pair.private_key)
            duplicate = net.processes["node-elsewhere"]
            deadline = time.monotonic() + 90
            while duplicate.alive():
                assert time.monotonic() < deadline, duplicate.tail()
                time.sleep(1)
            assert "Failed to activate SuperNode" in duplicate.tail(40)
            assert "could not be activated" in net.processes["superlink"].tail(400)
            shown = _fedpath("status", *conn, "--ca", str(pki.ca_cert))
            assert shown.returncode == 0
            assert "hospital_a" in shown.stdout and "online since" in shown.stdout

            runs = f'runs-dir="{tmp_path / "runs"}"'
            run_argv = [*conn, "--ca", str(pki.ca_cert), "-c", runs, "-c", "min-sites=2",
                        "--poll", "1"]  # fmt: skip
            followed = _fedpath("run", *run_argv, "--timeout", "2")
            text = " ".join(followed.stdout.split())
            assert followed.returncode == 1, followed.stdout
            assert "the run goes on on the SuperLink" in text
            assert "stop it:" in text

            # A followed run stopped from elsewhere with the command `fedpath run` printed.
            following = subprocess.Popen(
                [FEDPATH, "run", *run_argv, "--timeout", "300"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert following.stdout is not None
            stop_hint = ""
            while "stop it with:" not in stop_hint:
                stop_hint = following.stdout.readline()
                assert stop_hint, "fedpath run ended before printing how to stop the run"
            stop_argv = shlex.split(stop_hint.split(":", 1)[1])
            assert stop_argv[:2] == ["fedpath", "stop"]
            stopped = _fedpath(*stop_argv[1:])  # the hint, exactly as printed
            assert stopped.returncode == 0, stopped.stdout
            assert "stopped (finished:stopped)" in stopped.stdout
            rest = " ".join(following.communicate(timeout=120)[0].split())
            assert following.returncode == 1
            assert "did not complete (finished:stopped)" in rest
            assert "reason: stopped on request" in rest

            # The SuperLink goes away while a run is followed: said, with what to do.
            orphan = subprocess.Popen(
                [FEDPATH, "run", *run_argv, "--timeout", "300"], stdout=subprocess.PIPE, text=True
            )
            assert orphan.stdout is not None
            while "running" not in (line := orphan.stdout.readline()):
                assert line, "fedpath run ended before the run was running"
            net.stop_process("superlink")
            lost = " ".join(orphan.communicate(timeout=120)[0].split())
            assert orphan.returncode == 1
            assert "lost contact while following run" in lost
            assert "cannot reach the SuperLink" in lost and "fedpath status" in lost
        finally:
            os.killpg(node.pid, 15)
            node.wait(timeout=30)


def test_progress_comes_from_the_serverapp_log_when_the_run_dir_is_elsewhere(
    tmp_path: Path,
) -> None:
    """`fedpath run` on another host than the SuperLink cannot read metrics.jsonl."""
    from io import StringIO

    from rich.console import Console

    from fedpath.server.cli_run_follower import RunFollower

    class Log:
        text = "INFO : [fedpath] run directory: /srv/elsewhere/flwr-7\n"

        def run_log_text(self, run_id: int) -> str:
            return self.text

    log = Log()
    out = StringIO()
    follower = RunFollower(log, 7, 3, Console(file=out, width=80))
    follower.poll()
    assert follower.run_dir == Path("/srv/elsewhere/flwr-7")
    log.text += "INFO : [fedpath] round 1/3 done in 4.0 s: train loss 0.6000, val AUC 0.700\n"
    follower.poll()
    follower.poll()
    printed = out.getvalue()
    assert "is not on this machine" in printed
    assert printed.count("round 1/3 done in 4.0 s: train loss 0.6000") == 1


def test_link_names_a_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code = main(
            ["link", "--state", str(tmp_path / "state"), "--insecure", "--no-node-auth",
             "--port", str(port)]
        )  # fmt: skip
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in out and "--port" in out


def test_certs_keep_existing_does_not_call_expired_files_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = create_certificates(tmp_path / "pki")
    now = dt.datetime.now(dt.UTC)
    _self_signed(pki.ca_cert, now - dt.timedelta(days=900), now - dt.timedelta(days=1))
    code = main(["certs", "--out", str(tmp_path / "pki"), "--keep-existing"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2
    assert "cannot be kept" in out and "EXPIRED" in out and "--overwrite" in out
    assert "kept (already there and valid)" not in out


def test_node_names_a_wrong_or_expired_ca_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = create_certificates(tmp_path / "pki")
    other = create_certificates(tmp_path / "other")
    pair = create_node_keys(tmp_path / "keys", ["site_a"])[0]
    address, listener = _tls_server(pki.server_cert, pki.server_key)
    try:
        argv = _node_argv(tmp_path, free_port(), "--key", str(pair.private_key))
        argv[argv.index("--superlink") + 1] = address
        assert main([*argv, "--ca", str(other.ca_cert)]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert f"TLS to the SuperLink at {address} cannot work" in out
        assert f"{other.ca_cert} did not sign" in out
        now = dt.datetime.now(dt.UTC)
        old = _self_signed(tmp_path / "old.pem", now - dt.timedelta(days=9),
                           now - dt.timedelta(days=1))  # fmt: skip
        assert main([*argv, "--ca", str(old)]) == 2
        assert "EXPIRED" in capsys.readouterr().out
    finally:
        listener.close()


def test_printed_commands_work_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hints name the CA and Flower home by absolute paths (pasted elsewhere, they work)."""
    import argparse

    from fedpath.server.cli_connection import connection_flags

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(
        superlink="fl.example.org:9092", insecure=False, ca=Path("pki/ca.pem"),
        flwr_home=Path("my home"),
    )  # fmt: skip
    parsed = shlex.split(connection_flags(args))
    assert parsed[parsed.index("--ca") + 1] == str(tmp_path / "pki" / "ca.pem")
    assert parsed[parsed.index("--flwr-home") + 1] == str(tmp_path / "my home")


def test_compose_coordinator_prints_why_a_run_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The compose log is where the operator looks: the ServerApp's reason must be there."""
    import argparse

    from fedpath.deploy.coordinator import coordinate

    class Link:
        def flwr(self, *args: str, **kw: object) -> dict[str, object]:
            if args[:2] == ("supernode", "register"):
                return {"success": True, "node-id": 5}
            return {"success": True, "nodes": []}

        def connected_nodes(self) -> int:
            return 1

        def submit(self, app: Path, settings: dict[str, object]) -> int:
            return 9

        def wait_for_run(self, run_id: int, timeout: float) -> str:
            return "finished:failed"

        def run_log_text(self, run_id: int) -> str:
            return "INFO : [fedpath] run failed after 0 round(s): site_b: feature_dim is 8\n"

    key = create_node_keys(tmp_path / "keys", ["site_a"])[0].public_key
    args = argparse.Namespace(
        superlink="x:1", settings=[], public_keys=[key], ready_file=None, app=tmp_path,
        connect_timeout=5.0, nodes_timeout=5.0, run_timeout=5.0,
    )  # fmt: skip
    assert coordinate(args, Link()) == "finished:failed"  # type: ignore[arg-type]
    assert "ServerApp: run failed after 0 round(s): site_b: feature_dim is 8" in (
        capsys.readouterr().out
    )
