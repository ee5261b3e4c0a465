"""The deployment files: docker-compose.yml, deploy/Dockerfile and the systemd unit.

No Docker engine runs here, so the compose file is checked by real tools that need none (the
Compose Specification's JSON schema through check-jsonschema, and ``docker-compose config``
when installed), and its topology is compared with the processes ``deploy/local_network.py``
starts for the demo and the end-to-end tests: the same programs with the same flags, one
SuperNode per hospital whose node config points at that hospital's prepared data, secrets
mounted only where they are used. The systemd unit is checked with ``systemd-analyze``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

import fedpath.deploy.local_network as local_network
from fedpath.deploy.local_network import LocalNetwork

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
UNIT = ROOT / "deploy" / "fedpath-node.service"
UNIT_ENV = ROOT / "deploy" / "fedpath-node.env.example"
SITES = ("site_a", "site_b", "site_c")
APP_DIR = "/app"  # WORKDIR of deploy/Dockerfile: the source tree `flwr run` bundles


# -- helpers ---------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _flags(argv: list[str]) -> tuple[str, dict[str, str | None]]:
    """(program name, {flag: value or None}) of a ``prog --flag value --switch`` line."""
    flags: dict[str, str | None] = {}
    i = 1
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--"), f"positional {flag!r} in {argv}"
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flags[flag] = argv[i + 1]
            i += 2
        else:
            flags[flag] = None
            i += 1
    return Path(argv[0]).name, flags


def _node_config(text: str) -> dict[str, Any]:
    """``--node-config 'data-path="/x" site="a"'`` as a dict (each value is TOML)."""
    pairs = re.findall(r'([A-Za-z0-9_-]+)=("[^"]*"|\S+)', text)
    return {key: tomllib.loads(f"v = {value}")["v"] for key, value in pairs}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """volume name → mount target (read-only suffix dropped)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[source] = target
    return out


def _users_of(volume: str) -> set[str]:
    return {name for name, svc in _services().items() if volume in _mounts(svc)}


def _under(path: str, directory: str) -> bool:
    return Path(path).parent == Path(directory)


class _Started:
    """Stands in for a started process: the flags are what we compare, not the process."""

    def alive(self) -> bool:
        return True


def _process_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The command lines LocalNetwork runs for a TLS + node-auth network of the 3 sites."""
    recorded: dict[str, list[str]] = {}

    def spawn(name: str, argv: list[str]) -> _Started:
        recorded[name] = list(argv)
        return _Started()

    monkeypatch.setattr(local_network, "port_open", lambda port: True)
    net = LocalNetwork(
        tmp_path / "net",
        tls_ca=tmp_path / "ca.pem",
        tls_cert=tmp_path / "superlink.pem",
        tls_key=tmp_path / "superlink.key",
        node_auth=True,
    )
    monkeypatch.setattr(net, "_spawn", spawn)
    net.start_superlink()
    for site in SITES:
        net.start_supernode(site, tmp_path / site, private_key=tmp_path / f"{site}.key")
    net.stop()
    return recorded


def _coordinator_module() -> ModuleType:
    return importlib.import_module("fedpath.deploy.coordinator")


def _broken_copy(tmp_path: Path) -> Path:
    """The compose file with one misspelt key: a validator must refuse it."""
    text = COMPOSE.read_text(encoding="utf-8")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace("    restart: unless-stopped", "    restrat: unless-stopped"))
    assert broken.read_text() != text
    return broken


# -- validation by real tools ------------------------------------------------------------------


def _schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    schema = ["--builtin-schema", "vendor.compose-spec"]
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", *schema, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_compose_file_validates_against_the_compose_specification_schema() -> None:
    done = _schema_check(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_the_schema_check_refuses_a_misspelt_key(tmp_path: Path) -> None:
    done = _schema_check(_broken_copy(tmp_path))
    assert done.returncode != 0 and "restrat" in done.stdout + done.stderr


def _compose_tool() -> list[str]:
    """A compose implementation that validates without an engine (v2 plugin, or Debian's v1)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    message = "no compose tool: `apt-get install -y docker-compose` (works without an engine)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.slow
def test_docker_compose_config_accepts_the_file_and_refuses_a_mistake(tmp_path: Path) -> None:
    tool = _compose_tool()
    done = subprocess.run(
        [*tool, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    broken = subprocess.run(
        [*tool, "-f", str(_broken_copy(tmp_path)), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert broken.returncode != 0 and "restrat" in broken.stdout + broken.stderr


# -- topology: the same as the processes on loopback ----------------------------------------


def test_services_are_one_superlink_a_prepare_job_and_node_per_hospital_and_a_coordinator() -> None:
    expected = {"certs", "superlink", "coordinator"}
    expected |= {f"prepare-{s}" for s in SITES} | {f"node-{s}" for s in SITES}
    services = _services()
    assert set(services) == expected
    assert {svc["image"] for svc in services.values()} == {services["superlink"]["image"]}
    assert {svc["build"]["dockerfile"] for svc in services.values()} == {"deploy/Dockerfile"}
    assert not [name for name, svc in services.items() if "ports" in svc], "nothing published"


def test_superlink_runs_what_local_network_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prog, process = _flags(_process_argv(tmp_path, monkeypatch)["superlink"])
    svc = _services()["superlink"]
    compose_prog, compose = _flags(svc["command"])
    assert compose_prog == prog == "flower-superlink"
    # The only addition: listen beyond the container's loopback.
    assert set(compose) == set(process) | {"--host"}
    assert compose["--host"] == "0.0.0.0"
    mounts = _mounts(svc)
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert _under(str(compose[flag]), mounts["superlink-tls"]), flag
    assert _under(str(compose["--database"]), mounts["superlink-state"])
    assert f", {compose['--port']})" in " ".join(svc["healthcheck"]["test"])
    for volume in ("superlink-tls", "superlink-state"):
        assert _users_of(volume) <= {"certs", "superlink"}


@pytest.mark.parametrize("site", SITES)
def test_each_node_runs_what_local_network_runs_for_that_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site: str
) -> None:
    prog, process = _flags(_process_argv(tmp_path, monkeypatch)[f"node-{site}"])
    services = _services()
    node = services[f"node-{site}"]
    compose_prog, compose = _flags(node["command"])
    assert compose_prog == prog == "flower-supernode"
    assert set(compose) == set(process)
    _, link = _flags(services["superlink"]["command"])
    assert compose["--superlink"] == f"superlink:{link['--port']}"
    mounts = _mounts(node)
    assert _under(str(compose["--root-certificates"]), mounts["trust"])
    assert compose["--auth-supernode-private-key"] == f"{mounts[f'key-{site}']}/{site}.key"
    config = _node_config(str(compose["--node-config"]))
    assert set(config) == set(_node_config(str(process["--node-config"])))
    assert config["site"] == site
    assert Path(config["data-path"]).is_relative_to(mounts[f"data-{site}"])
    # Its prepare job writes exactly that folder, into the same volume.
    prepare = services[f"prepare-{site}"]
    assert prepare["environment"]["SITE"] == site
    assert f"--out {config['data-path']} " in prepare["command"][0]
    assert _mounts(prepare)[f"data-{site}"] == mounts[f"data-{site}"]
    # Least privilege: a hospital's key and data are mounted nowhere else.
    assert _users_of(f"key-{site}") == {"certs", f"node-{site}"}
    assert _users_of(f"data-{site}") == {f"prepare-{site}", f"node-{site}"}
    assert node["depends_on"] == {
        f"prepare-{site}": {"condition": "service_completed_successfully"},
        "coordinator": {"condition": "service_healthy"},
    }


def test_the_certs_job_makes_what_the_others_mount() -> None:
    services = _services()
    script = services["certs"]["command"][0]
    assert "fedpath certs --out /pki --san superlink --keep-existing" in script
    assert _users_of("pki") == {"certs"}, "the CA key is never mounted in a running service"
    assert "/superlink-tls/" in script and "/trust/ca.pem" in script
    assert "for site in " + " ".join(SITES) + ";" in script
    assert "fedpath keys new --out /keys/$$site $$site --keep-existing" in script
    for site in SITES:
        assert _mounts(services["certs"])[f"key-{site}"] == f"/keys/{site}"
    assert services["superlink"]["depends_on"] == {
        "certs": {"condition": "service_completed_successfully"}
    }


def test_coordinator_registers_every_hospital_and_runs_one_run() -> None:
    services = _services()
    coordinator = services["coordinator"]
    command = coordinator["command"]
    assert command[:3] == ["python", "-m", "fedpath.deploy.coordinator"]
    args: argparse.Namespace = _coordinator_module().build_parser().parse_args(command[3:])
    _, node = _flags(services[f"node-{SITES[0]}"]["command"])
    assert args.superlink == node["--superlink"]
    assert str(args.ca) == node["--root-certificates"]
    assert str(args.app) == APP_DIR
    assert [str(p) for p in args.public_keys] == [f"/trust/{s}.pub" for s in SITES]
    settings = dict(args.settings)
    assert settings["min-sites"] == len(SITES)
    assert _under(settings["runs-dir"] + "/x", _mounts(services["superlink"])["runs"])
    # Its health is "keys registered": that is what the SuperNodes wait for.
    assert str(args.ready_file) in coordinator["healthcheck"]["test"]
    assert coordinator["depends_on"] == {"superlink": {"condition": "service_healthy"}}


def test_every_service_has_the_environment_local_network_gives_flower(tmp_path: Path) -> None:
    env = LocalNetwork(tmp_path / "net").env()
    for name, svc in _services().items():
        for key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
            assert svc["environment"][key] == env[key], (name, key)


# -- the image ---------------------------------------------------------------------------------


def test_dockerfile_one_pinned_non_root_image_with_every_mount_point() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert re.search(r"^FROM python:3\.11-slim", text, re.MULTILINE)
    constraints = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    (torch_pin,) = re.findall(r"^torch==(\S+)$", constraints, re.MULTILINE)
    torch_at = next(i for i, line in enumerate(lines) if f"torch=={torch_pin}" in line)
    install_at = next(i for i, line in enumerate(lines) if "-c constraints.txt ." in line)
    assert "download.pytorch.org/whl/cpu" in lines[torch_at]
    assert torch_at < install_at, "torch comes first, from the CPU wheel index"
    (user,) = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user.split(":")[0] not in ("0", "root")
    assert "WORKDIR /app" in lines and "COPY deploy ./deploy" in lines
    # A new named volume takes the owner of its mount point in the image: every one must
    # exist there (owned by the unprivileged user) or the services cannot write to it.
    tokens = set(text.replace("\\", " ").split())
    targets = {t for svc in _services().values() for t in _mounts(svc).values()}
    assert sorted(targets - tokens) == []


# -- the systemd unit for the hospital daemon --------------------------------------------------


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def _example_env() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in UNIT_ENV.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if not k.startswith("#")}


def test_unit_runs_fedpath_node_with_its_settings_from_the_environment_file() -> None:
    settings = _unit_settings()
    (exec_start,) = settings["ExecStart"]
    env = _example_env()
    used = re.findall(r"\$\{(\w+)\}", exec_start)
    assert sorted(used) == sorted(env), "the example file sets exactly what ExecStart uses"
    argv = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], exec_start).split()
    assert Path(argv[0]).name == "fedpath" and argv[1] == "node"
    assert set(_flags(argv[1:])[1]) == {
        "--superlink",
        "--data",
        "--key",
        "--ca",
        "--site",
        "--device",
    }
    assert settings["EnvironmentFile"] == ["/etc/fedpath/node.env"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["User"] != ["root"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert settings[key] == [value], key
    assert f"-{env['FEDPATH_DATA']}" in settings["ReadWritePaths"]


def test_unit_command_line_is_what_fedpath_node_accepts() -> None:
    from fedpath.deploy.cli import build_parser

    parser = build_parser()
    (exec_start,) = _unit_settings()["ExecStart"]
    env = _example_env()
    argv = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], exec_start).split()
    args = parser.parse_args(argv[1:])
    assert args.command == "node"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return tool


def _unit_with_real_executable(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's fedpath (verify checks it exists)."""
    unit = tmp_path / UNIT.name
    fedpath = Path(sys.executable).with_name("fedpath")
    unit.write_text(UNIT.read_text().replace("/opt/fedpath/venv/bin/fedpath", str(fedpath)))
    return unit


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    done = subprocess.run(
        [_systemd_analyze(), "verify", str(_unit_with_real_executable(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # verify only warns about unknown or misplaced settings: treat a warning as a failure.
    problems = [
        line for line in done.stderr.splitlines() if UNIT.name in line and "ignoring" in line
    ]
    assert problems == []


def test_systemd_rates_the_unit_exposure_ok(tmp_path: Path) -> None:
    options = ["--offline=yes", "--no-pager", "--threshold=20"]
    done = subprocess.run(
        [_systemd_analyze(), "security", *options, str(_unit_with_real_executable(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
