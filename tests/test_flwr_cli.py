"""What ``flwr run`` is given to bundle: fedpath's app ships as its configuration alone."""

from __future__ import annotations

from pathlib import Path

from fedpath.server.flwr_cli import app_directory, app_to_ship

ROOT = Path(__file__).resolve().parents[1]


def test_fedpath_app_ships_its_pyproject_alone() -> None:
    with app_to_ship(app_directory()) as shipped:
        assert shipped != ROOT
        assert sorted(p.name for p in shipped.iterdir()) == ["pyproject.toml"]
        assert (shipped / "pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
    assert not shipped.exists()  # the staging folder is removed after the submission


def test_an_app_with_its_own_code_ships_as_it_is(tmp_path: Path) -> None:
    noop = ROOT / "bench" / "noop_app"
    with app_to_ship(noop) as shipped:
        assert shipped == noop
    (tmp_path / "pyproject.toml").write_text(
        '[tool.flwr.app.components]\nserverapp = "fedpath.server.app:app"\n'
        'clientapp = "mine.client:app"\n'
    )
    with app_to_ship(tmp_path) as shipped:
        assert shipped == tmp_path
    (tmp_path / "pyproject.toml").write_text("not toml [")
    with app_to_ship(tmp_path) as shipped:
        assert shipped == tmp_path  # flwr itself reports the broken file
