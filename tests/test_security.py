"""TLS certificates, SuperNode keys and their registration (server/security.py).

Fast tests check the files themselves with the libraries that will read them (cryptography's
X.509 path validation, Python's ssl, Flower's own key loaders). The slow ones run real
processes: a TLS + node-auth SuperLink with these files completes a run of two registered
SuperNodes driven by the compose coordinator (deploy/coordinator.py), refuses a SuperNode
whose key was never registered, and gives a restarted SuperNode its old node id.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification as xv

from fedpath.deploy.cli import main as fedpath_main
from fedpath.server.security import (
    DEFAULT_SANS,
    KeyExistsError,
    RegistrationError,
    SecurityError,
    certificate_sans,
    create_certificates,
    create_node_keys,
    load_node_private_key,
    public_key_fingerprint,
    register_public_keys,
    verify_signed_by,
)

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- certificates ----------------------------------------------------------------------------


def test_server_certificate_names_loopback_and_the_extra_sans(tmp_path: Path) -> None:
    files = create_certificates(tmp_path / "pki", ["superlink", "10.1.2.3", "Link.Example.org"])
    names = certificate_sans(_load(files.server_cert))
    assert names == {*DEFAULT_SANS, "superlink", "10.1.2.3", "link.example.org"}
    ext = _load(files.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    # Addresses must be IP SANs: TLS clients never match an IP against a DNS name.
    assert ipaddress.ip_address("::1") in ext.value.get_values_for_type(x509.IPAddress)


def test_the_ca_signs_the_server_certificate_and_paths_validate(tmp_path: Path) -> None:
    files = create_certificates(tmp_path / "pki", ["superlink"])
    ca, leaf = _load(files.ca_cert), _load(files.server_cert)
    assert verify_signed_by(leaf, ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    verifier = xv.PolicyBuilder().store(xv.Store([ca]))
    for name in (xv.DNSName("superlink"), xv.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = verifier.build_server_verifier(name).verify(leaf, [])
        assert chain[-1] == ca
    with pytest.raises(xv.VerificationError):
        verifier.build_server_verifier(xv.DNSName("elsewhere.example")).verify(leaf, [])
    other = create_certificates(tmp_path / "other")
    assert not verify_signed_by(leaf, _load(other.ca_cert))


def test_python_ssl_accepts_the_files_as_a_server_and_as_a_client(tmp_path: Path) -> None:
    """The SuperLink (uvicorn) and every client load these files through Python's ssl."""
    files = create_certificates(tmp_path / "pki")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files.server_cert, files.server_key)  # the key matches the cert
    client = ssl.create_default_context(cafile=str(files.ca_cert))
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(client_in, client_out, server_hostname="localhost")
    s = server.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):  # an in-memory handshake: the client verifies chain and host name
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    assert c.version() is not None and s.version() is not None


def test_private_keys_are_0600_and_certificates_public(tmp_path: Path) -> None:
    files = create_certificates(tmp_path / "pki")
    assert _mode(files.ca_key) == _mode(files.server_key) == 0o600
    assert _mode(files.ca_cert) == _mode(files.server_cert) == 0o644
    assert _mode(tmp_path / "pki") == 0o700
    assert not [p for p in (tmp_path / "pki").iterdir() if p.name.startswith(".")]


def test_certificates_are_never_replaced_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    first = create_certificates(out, ["superlink"])
    before = {p: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(KeyExistsError, match="refusing to overwrite"):
        create_certificates(out, ["superlink"])
    kept = create_certificates(out, ["superlink"], existing="keep")
    assert kept.created == () and {p: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(SecurityError, match="does not name elsewhere"):
        create_certificates(out, ["elsewhere"], existing="keep")
    create_certificates(out, ["superlink"], existing="overwrite")
    assert first.ca_key.read_bytes() != before[first.ca_key]


def test_keep_refuses_an_incomplete_set(tmp_path: Path) -> None:
    files = create_certificates(tmp_path / "pki")
    files.server_key.unlink()
    with pytest.raises(SecurityError, match="incomplete set"):
        create_certificates(tmp_path / "pki", existing="keep")


@pytest.mark.parametrize("bad", ["bad name", "-x", "a/b", "host_with_underscore.org"])
def test_bad_san_is_refused_before_anything_is_written(tmp_path: Path, bad: str) -> None:
    with pytest.raises(SecurityError, match="neither an IP address nor a valid host name"):
        create_certificates(tmp_path / "pki", [bad])
    assert not (tmp_path / "pki").exists()


# -- node keys -------------------------------------------------------------------------------


def test_node_keys_are_in_the_format_flower_loads(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, uses_nist_ec_curve

    (pair,) = create_node_keys(tmp_path / "keys", ["site_a"])
    # What flower-supernode --auth-supernode-private-key does:
    private = load_ssh_private_key(pair.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    # What flwr supernode register does, and what the SuperLink then checks:
    registered = bytes_to_public_key(try_load_public_key(pair.public_key))
    assert uses_nist_ec_curve(registered)
    assert registered == private.public_key()
    assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert public_key_fingerprint(pair.public_key).startswith("SHA256:")


def test_node_private_keys_are_0600(tmp_path: Path) -> None:
    pairs = create_node_keys(tmp_path / "keys", ["site_a", "site_b"])
    for pair in pairs:
        assert _mode(pair.private_key) == 0o600
        assert _mode(pair.public_key) == 0o644
    assert _mode(tmp_path / "keys") == 0o700


def test_a_hospital_key_is_never_replaced_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    (a,) = create_node_keys(out, ["site_a"])
    original = a.private_key.read_bytes()
    with pytest.raises(KeyExistsError, match=r"site_a\.key.*node identity"):
        create_node_keys(out, ["site_a", "site_b"])
    assert not (out / "site_b.key").exists(), "nothing is written when anything is refused"
    kept = create_node_keys(out, ["site_a", "site_b"], existing="keep")
    assert [(p.site, p.created) for p in kept] == [("site_a", False), ("site_b", True)]
    assert a.private_key.read_bytes() == original
    create_node_keys(out, ["site_a"], existing="overwrite")
    assert a.private_key.read_bytes() != original


def test_keep_refuses_half_a_pair_or_a_mismatched_pair(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    a, b = create_node_keys(out, ["site_a", "site_b"])
    a.public_key.unlink()
    with pytest.raises(SecurityError, match="is missing but its pair exists"):
        create_node_keys(out, ["site_a"], existing="keep")
    a.public_key.write_bytes(b.public_key.read_bytes())
    with pytest.raises(SecurityError, match="not the public half"):
        create_node_keys(out, ["site_a"], existing="keep")


@pytest.mark.parametrize("site", ["../x", "a b", ".hidden", ""])
def test_site_names_must_be_file_names(tmp_path: Path, site: str) -> None:
    with pytest.raises(SecurityError, match="site name"):
        create_node_keys(tmp_path / "keys", [site])


def test_a_non_ec_key_is_refused_as_a_node_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = tmp_path / "ed.key"
    path.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(SecurityError, match="not an elliptic-curve"):
        load_node_private_key(path)


# -- registration (with a stand-in for the flwr CLI) -------------------------------------------


class FakeFlwr:
    """Answers ``flwr supernode register`` as Flower 1.41 does, in JSON."""

    def __init__(self, registered: set[str], down: frozenset[str] = frozenset()) -> None:
        self.registered = registered
        self.down = down
        self.calls: list[tuple[str, ...]] = []

    def flwr(self, *args: str, timeout: float = 60.0, cwd: Path | None = None) -> dict[str, Any]:
        self.calls.append(args)
        name = Path(args[2]).stem
        if name in self.down:
            return {"success": False, "error-message": "Connection refused"}
        if name in self.registered:
            return {
                "success": False,
                "error-message": "Public key already in use while registering node for "
                "flwr_aid=<id:none>, account_name=none.",
            }
        self.registered.add(name)
        return {"success": True, "node-id": 1000 + len(self.registered)}


def test_registration_tries_every_key_and_names_the_failures(tmp_path: Path) -> None:
    pairs = create_node_keys(tmp_path / "keys", ["site_a", "site_b", "site_c"])
    fake = FakeFlwr(registered={"site_b"}, down=frozenset({"site_c"}))
    with pytest.raises(RegistrationError) as caught:
        register_public_keys(fake, [p.public_key for p in pairs], connection="conn")
    err = caught.value
    assert list(err.failures) == [pairs[2].public_key]
    assert "Connection refused" in str(err) and "site_c.pub" in str(err)
    assert [(r.public_key.stem, r.already_registered) for r in err.registered] == [
        ("site_a", False),
        ("site_b", True),
    ]
    assert all(c[:2] == ("supernode", "register") and c[3] == "conn" for c in fake.calls)


def test_a_bad_public_key_fails_locally_without_asking_the_superlink(tmp_path: Path) -> None:
    (good,) = create_node_keys(tmp_path / "keys", ["site_a"])
    bad = tmp_path / "keys" / "junk.pub"
    bad.write_text("not a key\n")
    fake = FakeFlwr(registered=set())
    with pytest.raises(RegistrationError, match=r"junk\.pub: not an OpenSSH public key"):
        register_public_keys(fake, [bad, good.public_key])
    assert len(fake.calls) == 1, "the good key is still registered"


# -- CLI -------------------------------------------------------------------------------------


def test_cli_certs_and_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki, keys = str(tmp_path / "pki"), str(tmp_path / "keys")
    assert fedpath_main(["certs", "--out", pki, "--san", "superlink"]) == 0
    assert "superlink" in capsys.readouterr().out
    assert fedpath_main(["certs", "--out", pki]) == 2
    assert "--keep-existing" in capsys.readouterr().out
    assert fedpath_main(["certs", "--out", pki, "--san", "superlink", "--keep-existing"]) == 0
    assert fedpath_main(["keys", "new", "--out", keys, "site_a", "site_b"]) == 0
    out = capsys.readouterr().out
    assert "site_a: created" in out and "SHA256:" in out
    assert fedpath_main(["keys", "new", "--out", keys, "site_a"]) == 2
    assert fedpath_main(["keys", "new", "--out", keys, "site_a", "--keep-existing"]) == 0
    assert "site_a: kept" in capsys.readouterr().out


# -- real processes --------------------------------------------------------------------------


def _secure_network(tmp_path: Path) -> tuple[Any, Any]:
    from fedpath.deploy.local_network import LocalNetwork

    certs = create_certificates(tmp_path / "pki")
    net = LocalNetwork(
        tmp_path / "net",
        tls_ca=certs.ca_cert,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        node_auth=True,
    )
    return net, certs


def _nodes(net: Any) -> dict[str, str]:
    """node id → status, as the SuperLink lists them."""
    answer = net.flwr("supernode", "list", "local")
    return {str(n["node-id"]): str(n["status"]) for n in answer.get("nodes") or []}


def _wait(condition: Any, what: str, timeout: float, net: Any) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: {dict(net.logs())}"
        time.sleep(1.0)


@pytest.mark.slow
@pytest.mark.integration
def test_tls_and_node_auth_run_with_the_compose_coordinator(tmp_path: Path) -> None:
    """The compose order on loopback: SuperLink, the coordinator registers the two keys and
    signals it, the SuperNodes start, the coordinator runs two rounds and checks flwr ls."""
    from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

    spec = SyntheticSiteSpec(n_slides=10, feature_dim=16, patches=(10, 30))
    sites = {n: write_synthetic_site(tmp_path / n, spec, seed=i) for i, n in enumerate("ab")}
    pairs = create_node_keys(tmp_path / "keys", [f"site_{n}" for n in sites])
    net, certs = _secure_network(tmp_path)
    ready = tmp_path / "keys-registered"
    with net:
        net.start_superlink()
        argv = [
            sys.executable,
            "-m",
            "fedpath.deploy.coordinator",
            "--superlink",
            net.address,
            "--ca",
            str(certs.ca_cert),
            "--app",
            str(ROOT),
            "--ready-file",
            str(ready),
            "--nodes-timeout",
            "120",
            "--run-timeout",
            "400",
            "--set",
            "num-server-rounds=2",
            "--set",
            "local-epochs=1",
            "--set",
            "min-sites=2",
            "--set",
            f'runs-dir="{tmp_path / "runs"}"',
            "--set",
            'run-name="secure"',
            *[str(p.public_key) for p in pairs],
        ]
        log = open(tmp_path / "coordinator.log", "w+")  # noqa: SIM115 - closed below
        coordinator = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=net.env())
        try:
            _wait(lambda: ready.exists() or coordinator.poll() is not None, "keys", 120, net)
            assert ready.exists(), (tmp_path / "coordinator.log").read_text()
            assert sorted(_nodes(net).values()) == ["registered", "registered"]
            for pair, data in zip(pairs, sites.values(), strict=True):
                net.start_supernode(pair.site, data, private_key=pair.private_key)
            code = coordinator.wait(timeout=600)
        finally:
            if coordinator.poll() is None:
                coordinator.kill()
            log.close()
        output = (tmp_path / "coordinator.log").read_text()
        assert code == 0, f"{output}\n{dict(net.logs())}"
        assert "run finished: finished:completed" in output
        runs = net.flwr("ls", "local").get("runs") or []
        assert [r["status"] for r in runs] == ["finished:completed"]
    final = json.loads((tmp_path / "runs" / "secure" / "final.json").read_text())
    assert final["status"] == "completed" and final["rounds_completed"] == 2


@pytest.mark.slow
@pytest.mark.integration
def test_unregistered_key_is_refused_and_a_key_keeps_its_node_id(tmp_path: Path) -> None:
    from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

    data = write_synthetic_site(tmp_path / "a", SyntheticSiteSpec(n_slides=4), seed=0)
    good, rogue = create_node_keys(tmp_path / "keys", ["site_a", "rogue"])
    net, certs = _secure_network(tmp_path)
    with net:
        net.start_superlink()
        # Registered through the CLI, as a coordinator would (its own FLWR_HOME, TLS).
        code = fedpath_main(
            [
                "keys",
                "register",
                "--superlink",
                net.address,
                "--ca",
                str(certs.ca_cert),
                "--flwr-home",
                str(tmp_path / "home"),
                str(good.public_key),
            ]
        )
        assert code == 0
        (node_id,) = _nodes(net)
        net.start_supernode("site_a", data, private_key=good.private_key)
        net.start_supernode("rogue", data, private_key=rogue.private_key)
        rogue_proc = net.processes["node-rogue"]
        _wait(lambda: not rogue_proc.alive(), "the rogue SuperNode to be refused", 90, net)
        # Flower 1.41: the SuperLink answers ActivateNode with API error 2004 ("No SuperNode
        # found with the given public key"); the SuperNode logs its exit code 305 and stops
        # (the process itself exits with status 1).
        assert rogue_proc.process.returncode != 0
        log = rogue_proc.tail(40)
        assert "Exit Code: 305" in log and "[code: 2004] Failed to activate SuperNode" in log
        _wait(lambda: _nodes(net) == {node_id: "online"}, "site_a online", 90, net)
        # Restart: the same key is the same node, not a new one.
        net.stop_process("node-site_a")
        net.start_supernode("site_a", data, private_key=good.private_key)
        _wait(lambda: _nodes(net) == {node_id: "online"}, "site_a back online", 120, net)
        assert f"SuperNode ID: {node_id}" in net.processes["node-site_a"].tail(40)
        # A second registration of the same key is reported as done, not as a failure.
        (again,) = register_public_keys(net.cli, [good.public_key])
        assert again.already_registered


def test_key_files_are_written_atomically_without_a_world_readable_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mode is set on the temporary file before it gets its final name."""
    seen: list[int] = []
    real_replace = os.replace

    created: list[int] = []
    real_open = os.open

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith(".key"):
            seen.append(stat.S_IMODE(os.stat(src).st_mode))
        real_replace(src, dst)

    def open_spy(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        fd = real_open(path, flags, *args)
        if flags & os.O_CREAT and str(path).endswith(".key"):
            created.append(stat.S_IMODE(os.fstat(fd).st_mode))  # not even empty and readable
        return fd

    monkeypatch.setattr(os, "replace", spy)
    monkeypatch.setattr(os, "open", open_spy)
    create_node_keys(tmp_path / "keys", ["site_a"])
    assert seen == [0o600]
    assert created == [0o600]
