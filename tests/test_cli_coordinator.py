"""`fedpath link / node / run / status`: command lines, refusals, and run outcome from flwr ls."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import pytest

from fedpath.client.cli_node import supernode_argv
from fedpath.common.errors import ConfigError
from fedpath.server.cli_link import superlink_argv
from fedpath.server.cli_run import parse_overrides
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site


def _link_args(tmp_path: Path, **kw: object) -> argparse.Namespace:
    base = dict(
        state=tmp_path / "state",
        host="0.0.0.0",
        port=9092,
        ca=None,
        cert=None,
        key=None,
        insecure=False,
        no_node_auth=False,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_link_defaults_to_tls_node_auth_state_and_no_dependency_install(tmp_path: Path) -> None:
    pki = {name: tmp_path / name for name in ("ca.pem", "server.pem", "server.key")}
    for path in pki.values():
        path.write_text("x")
    argv = superlink_argv(
        _link_args(tmp_path, ca=pki["ca.pem"], cert=pki["server.pem"], key=pki["server.key"])
    )
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert "--disable-runtime-dependency-installation" in argv
    assert argv[argv.index("--database") + 1] == str(tmp_path / "state" / "superlink-state.db")
    assert argv[argv.index("--ssl-certfile") + 1] == str(pki["server.pem"])


def test_link_refuses_missing_certificates_and_auth_without_tls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--ca is required"):
        superlink_argv(_link_args(tmp_path))
    with pytest.raises(ConfigError, match=r"does not exist .*fedpath certs"):
        superlink_argv(_link_args(tmp_path, ca=tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match="needs TLS"):
        superlink_argv(_link_args(tmp_path, insecure=True))
    assert "--insecure" in superlink_argv(_link_args(tmp_path, insecure=True, no_node_auth=True))


def _node_args(tmp_path: Path, data: Path, **kw: object) -> argparse.Namespace:
    base = dict(
        superlink="link.example:9092",
        data=data,
        key=None,
        ca=None,
        site=None,
        port=9094,
        insecure=False,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_node_refuses_an_unprepared_directory_and_missing_key_or_ca(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not a prepared data directory.*fedpath prepare"):
        supernode_argv(_node_args(tmp_path, tmp_path / "empty"))
    data = write_synthetic_site(tmp_path / "site_a", SyntheticSiteSpec(n_slides=4), seed=0)
    with pytest.raises(ConfigError, match="--ca is required"):
        supernode_argv(_node_args(tmp_path, data))
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigError, match=r"--key .*does not exist.*fedpath keys"):
        supernode_argv(_node_args(tmp_path, data, ca=ca, key=tmp_path / "a.key"))


def test_node_command_line_points_the_client_at_the_data(tmp_path: Path) -> None:
    data = write_synthetic_site(tmp_path / "site_a", SyntheticSiteSpec(n_slides=4), seed=0)
    ca, key = tmp_path / "ca.pem", tmp_path / "a.key"
    ca.write_text("x")
    key.write_text("x")
    argv = supernode_argv(_node_args(tmp_path, data, ca=ca, key=key, site="hospital_a"))
    node_config = argv[argv.index("--node-config") + 1]
    assert node_config == f'data-path="{data.resolve()}" site="hospital_a" resident-worker=true'
    off = supernode_argv(
        _node_args(tmp_path, data, ca=ca, key=key, site="hospital_a", no_resident_worker=True)
    )
    assert off[off.index("--node-config") + 1].endswith("resident-worker=false")
    capped = supernode_argv(
        _node_args(tmp_path, data, ca=ca, key=key, site="hospital_a", torch_threads=2)
    )
    capped_config = capped[capped.index("--node-config") + 1]
    assert capped_config.endswith("resident-worker=true torch-threads=2")
    with pytest.raises(ConfigError, match="torch-threads must be a whole number"):
        supernode_argv(_node_args(tmp_path, data, ca=ca, key=key, torch_threads=0))
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(key)
    assert argv[argv.index("--root-certificates") + 1] == str(ca)


def test_the_flwr_connection_file_holds_any_address_and_ca_path(tmp_path: Path) -> None:
    """config.toml is written by tomli_w: a quote in a typed address or a backslash or
    accent in the CA path stays a value (the hand-written file put the address unescaped)."""
    from fedpath.server.flwr_cli import CONNECTION, FlwrCli

    ca = tmp_path / 'pki é\\"x' / "ca.pem"
    FlwrCli(tmp_path / "home", 'link"1:9093', tls_ca=ca).write_connection()
    tls = tomllib.loads((tmp_path / "home" / "config.toml").read_text(encoding="utf-8"))
    assert tls["superlink"] == {
        "default": CONNECTION,
        CONNECTION: {"address": 'link"1:9093', "root-certificates": str(ca.resolve())},
    }
    FlwrCli(tmp_path / "plain", "127.0.0.1:9093").write_connection()
    plain = tomllib.loads((tmp_path / "plain" / "config.toml").read_text(encoding="utf-8"))
    assert plain["superlink"][CONNECTION] == {"address": "127.0.0.1:9093", "insecure": True}


def test_run_overrides_are_toml_values() -> None:
    assert parse_overrides(["num-server-rounds=4", "strategy=fedavg", 'run-name="x y"']) == {
        "num-server-rounds": 4,
        "strategy": "fedavg",
        "run-name": "x y",
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["rounds"])


@pytest.mark.slow
@pytest.mark.integration
def test_fedpath_run_exit_code_follows_flwr_ls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """0 for a completed run, 1 for a failed one (here: a site with other features); the
    output shows every round, the run directory and report, and for the failed run the
    reason from its own files and a `flwr log` command that works when pasted."""
    from fedpath.deploy.cli import main
    from fedpath.deploy.local_network import LocalNetwork

    spec = SyntheticSiteSpec(n_slides=10, feature_dim=16, patches=(10, 30))
    a = write_synthetic_site(tmp_path / "a", spec, seed=0)
    b = write_synthetic_site(tmp_path / "b", spec, seed=1)
    odd = write_synthetic_site(
        tmp_path / "odd", SyntheticSiteSpec(n_slides=10, feature_dim=8), seed=2
    )
    with LocalNetwork(tmp_path / "net") as net:
        net.start_superlink()
        for name, data in (("site_a", a), ("site_b", b)):
            net.start_supernode(name, data)
        common = [
            "run",
            "--superlink",
            net.address,
            "--insecure",
            "--flwr-home",
            str(tmp_path / "home"),
            "--timeout",
            "600",
            "--poll",
            "1",
        ]
        runs = f'runs-dir="{tmp_path / "runs"}"'
        ok = main(
            [
                *common,
                "-c",
                "num-server-rounds=1",
                "-c",
                "local-epochs=1",
                "-c",
                runs,
                "-c",
                'run-name="ok"',
                "-c",
                "connect-timeout=120.0",
            ]
        )
        out = capsys.readouterr().out
        assert ok == 0, out
        assert "round 1/1: 2/2 sites answered, train loss" in out
        ok_dir = tmp_path / "runs" / "ok"
        assert f"run directory (on the SuperLink host): {ok_dir.resolve()}" in out
        assert f"report: {ok_dir.resolve() / 'report.html'}" in out
        run_id = next(line.split()[1] for line in out.splitlines() if "submitted to" in line)
        status = main(["status", *common[1:6]])
        shown = capsys.readouterr().out
        assert status == 0, shown
        assert f"│ {run_id} " in shown, "a run id in `fedpath status` must be whole (80 columns)"
        assert "finished:completed" in shown and "online" in shown
        net.start_supernode("site_odd", odd)
        time_limit = 60
        import time

        deadline = time.monotonic() + time_limit
        while net.connected_nodes() < 3 and time.monotonic() < deadline:
            time.sleep(1)
        failed = main([*common, "-c", runs, "-c", 'run-name="bad"', "-c", "min-sites=3"])
        out = capsys.readouterr().out
        assert failed == 1, out
        assert "did not complete (finished:failed) after 0 round(s)" in out
        assert "reason: the sites' prepared data do not match" in out
        assert "site_odd: embedded with synthetic (sha256 55555555" in out
        bad_dir = (tmp_path / "runs" / "bad").resolve()
        assert f"run directory (on the SuperLink host): {bad_dir}" in out
        hint = next(line for line in out.splitlines() if line.startswith("ServerApp log: "))
        import subprocess

        shown = subprocess.run(
            hint.removeprefix("ServerApp log: "),
            shell=True,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            check=False,
        )
        assert "[fedpath] run failed after 0 round(s)" in shown.stdout, shown
    assert (tmp_path / "runs" / "ok" / "final.json").is_file()
    bad_final = json.loads((tmp_path / "runs" / "bad" / "final.json").read_text())
    assert "site_odd: embedded with synthetic (sha256 55555555…, 8-d)" in bad_final["reason"]


def test_local_network_hands_absolute_paths_to_its_processes(tmp_path: Path, monkeypatch) -> None:
    """Regression: `fedpath demo --out demo-output` (relative) gave the SuperLink, whose cwd is
    the network folder, a CA path it could not find."""
    from fedpath.deploy.local_network import LocalNetwork

    monkeypatch.chdir(tmp_path)
    net = LocalNetwork(
        Path("demo-output") / "network",
        tls_ca=Path("pki/ca.pem"),
        tls_cert=Path("pki/s.pem"),
        tls_key=Path("pki/s.key"),
    )
    assert net.workdir.is_absolute()
    args = net._tls_args(server=True)
    paths = [args[i + 1] for i, a in enumerate(args) if a.startswith("--ssl-")]
    assert paths and all(Path(p).is_absolute() for p in paths)
    net.write_connection()
    assert f'"{tmp_path / "pki" / "ca.pem"}"' in (net.flwr_home / "config.toml").read_text()
