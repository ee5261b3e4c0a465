"""``fedpath report``: run files read strictly, one self-contained page rendered from them alone.

Run directories are written by hand here, to the ServerApp's contract (config.json,
metrics.jsonl, final.json): 3 sites, 3 rounds, one site failing in round 2, round 2 retried,
with and without DP, with and without final.json. One site name and one failure reason carry
markup, to prove every string from a run file is escaped.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import pytest

from fedpath.common.errors import ConfigError
from fedpath.deploy.cli import EXIT_OK, EXIT_USAGE, main
from fedpath.server.report.page import render_report
from fedpath.server.report.paths import PathScrub
from fedpath.server.report.plots import figures, mpl_text
from fedpath.server.report.series import rounds_for_plots
from fedpath.server.run_files import read_final, read_metrics, read_run

SITES = ["site_a", "<b>x</b>", "site_c"]
EVIL_REASON = "timeout after 600 s <script>alert(1)</script>"
PRIVACY_TEXT = "slide-level DP-SGD per site (Opacus RDP), δ = 1e-5"


def _config() -> dict[str, Any]:
    return {
        "run_config": {
            "num-server-rounds": 3,
            "strategy": "fedmix",
            "fedmix-lambda": 10.0,
            "fedmix-beta": 1.5,
            "local-epochs": 2,
        },
        "fedpath_version": "0.1.0",
        "flwr_run_id": 4242,
        "started": "2026-05-01T10:00:00Z",
        "model_config": {"kind": "clam_sb", "hidden_dim": 128},
        "train_config": {"lr": 0.0002, "supervision": {"mode": "mixed"}},
        "sites": {
            name: {
                "encoder": "tiny_cnn",
                "encoder_sha256": "ab" * 32,
                "feature_dim": 64,
                "target_mpp": 0.5,
                "patch_size": 256,
                "labels": ["normal", "tumour"],
                "n_slides": 20 + 10 * i,
                "from_a_newer_version": True,
            }
            for i, name in enumerate(SITES)
        },
        "privacy_guarantee": PRIVACY_TEXT,
        "some_future_field": {"ignored": True},
    }


def _round(number: int, *, privacy: bool) -> dict[str, Any]:
    failing = {"site_c": EVIL_REASON} if number == 2 else {}
    replied = [s for s in SITES if s not in failing]
    raw = {s: 1.0 / len(replied) + 0.05 * (i - 1) for i, s in enumerate(replied)}
    total = sum(raw.values())
    train = {
        s: {
            "num_examples": 20 + 10 * i,
            "train_loss": 0.7 - 0.1 * number + 0.02 * i,
            "val_loss": 0.75 - 0.08 * number + 0.03 * i,
            "val_auc": 0.6 + 0.1 * number - 0.03 * i,
            "val_patch_auc": None if s == "site_a" else 0.55 + 0.1 * number - 0.04 * i,
            "seconds": 12.5,
        }
        for i, s in enumerate(SITES)
        if s in replied
    }
    return {
        "round": number,
        "attempt": 2 if number == 2 else 1,
        "started": 1_780_000_000.0 + 60 * number,
        "seconds": 31.4,
        "strategy": "fedmix",
        "sampled": SITES,
        "replied": replied,
        "failed": failing,
        "weights": {s: w / total for s, w in raw.items()},
        "train": train,
        "evaluate": {
            s: {
                "num_examples": 5,
                "loss": 0.72 - 0.06 * number + 0.02 * i,
                "auc": 0.7 + 0.05 * number - 0.02 * i,
                "patch_auc": None if s == "site_a" else 0.6 + 0.08 * number - 0.03 * i,
                "balanced_accuracy": 0.65,
                "f1": 0.6,
            }
            for i, s in enumerate(replied)
        },
        "global": {
            "train_loss": 0.68 - 0.1 * number,
            "val_loss": 0.74 - 0.06 * number,
            "val_auc": 0.68 + 0.05 * number,
            "val_patch_auc": 0.58 + 0.08 * number,
        },
        "privacy": (
            {s: {"epsilon": 1.1 * number + 0.2 * i, "delta": 1e-5} for i, s in enumerate(replied)}
            if privacy
            else {}
        ),
    }


def _final() -> dict[str, Any]:
    metrics = {"loss": 0.41, "auc": 0.88, "patch_auc": 0.79, "balanced_accuracy": 0.81, "f1": 0.8}
    return {
        "status": "completed",
        "reason": None,
        "rounds_completed": 3,
        "num_rounds": 3,
        "test": {s: {"num_examples": 6 + i, **metrics} for i, s in enumerate(SITES)},
        "global_test": {"num_examples": 21, **metrics, "auc": 0.8765},
    }


def make_run(root: Path, *, privacy: bool = True, final: bool = True, rounds: int = 3) -> Path:
    """A run directory as the ServerApp leaves it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(_config()), encoding="utf-8")
    lines = [json.dumps(_round(n, privacy=privacy)) for n in range(1, rounds + 1)]
    if rounds:
        (root / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if final:
        (root / "final.json").write_text(json.dumps(_final()), encoding="utf-8")
    (root / "checkpoints").mkdir()
    for n in range(1, rounds + 1):
        (root / "checkpoints" / f"round_{n:04d}.pt").write_bytes(b"x")
    return root


def _assert_png(data: bytes) -> None:
    image = mpimg.imread(io.BytesIO(data), format="png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400


class _References(HTMLParser):
    """Every attribute of the page that can make a browser load something, and the alt text
    of each image (its plot's title)."""

    LOADING = frozenset(
        {"src", "href", "srcset", "data", "poster", "action", "background", "xlink:href"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.references: list[tuple[str, str, str]] = []
        self.images: dict[str, bytes] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name, value in attrs:
            if name in self.LOADING:
                self.references.append((tag, name, value or ""))
        src = values.get("src") or ""
        if tag == "img" and src.startswith("data:image/png;base64,"):
            self.images[values.get("alt") or ""] = base64.b64decode(src.split(",", 1)[1])


def _references(text: str) -> _References:
    parser = _References()
    parser.feed(text)
    return parser


# -------------------------------------------------------------------------------------------
# Readers.


def test_reader_validates_used_fields_and_ignores_unknown_ones(tmp_path: Path) -> None:
    run = read_run(make_run(tmp_path / "run"))
    assert run.config.flwr_run_id == 4242
    assert run.config.sites["<b>x</b>"].n_slides == 30
    assert [r.round for r in run.rounds] == [1, 2, 3]
    assert run.rounds[1].attempt == 2 and run.rounds[1].failed == {"site_c": EVIL_REASON}
    assert "site_c" not in run.rounds[1].train
    assert run.rounds[0].train["site_a"].val_patch_auc is None
    assert run.final is not None and run.final.global_test is not None
    assert run.latest_checkpoint == tmp_path / "run" / "checkpoints" / "round_0003.pt"
    assert run.site_names() == SITES


def test_torn_metrics_line_is_a_config_error_naming_the_line(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], lines[2][: len(lines[2]) // 2]]) + "\n")
    with pytest.raises(ConfigError, match=r"metrics\.jsonl, line 3: not valid JSON.*torn"):
        read_metrics(run_dir)


def test_wrong_type_in_metrics_line_names_line_and_field(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["train"]["site_a"]["num_examples"] = "twenty"
    path.write_text("\n".join([lines[0], "", json.dumps(bad), lines[2]]) + "\n")
    with pytest.raises(ConfigError, match=r"line 3: train\.site_a\.num_examples"):
        read_metrics(run_dir)


def test_non_object_line_and_bad_final_are_config_errors(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    (run_dir / "metrics.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="line 1: expected a JSON object, got list"):
        read_metrics(run_dir)
    (run_dir / "final.json").write_text('{"status": "completed"}')
    with pytest.raises(ConfigError, match=r"final\.json: rounds_completed: Field required"):
        read_final(run_dir)


def test_a_folder_without_config_or_final_is_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"neither config\.json nor final\.json"):
        read_run(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_run(tmp_path / "nowhere")


# -------------------------------------------------------------------------------------------
# Report.


@pytest.mark.slow
def test_report_files_and_escaped_content(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    page = render_report(run_dir)
    assert page == run_dir / "report.html"
    text = page.read_text(encoding="utf-8")
    images = _references(text).images
    assert sorted(images) == ["AUC", "Aggregation weights", "Loss", "Privacy spent"]
    for data in images.values():
        _assert_png(data)
    assert not (run_dir / "plots").exists()
    assert "&lt;b&gt;x&lt;/b&gt;" in text and "<b>x</b>" not in text
    assert "timeout after 600 s &lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script" not in text.lower()
    assert "http://" not in text and "https://" not in text
    for site in ("site_a", "site_c"):
        assert site in text
    assert "Completed: 3 of 3 rounds." in text
    assert PRIVACY_TEXT.replace("δ", "δ") in text
    assert "2 (retried)" in text
    assert "fedmix-lambda" in text and "0.8765" in text
    assert "<strong>all sites</strong>" in text and "not a metric over all slides" in text
    assert "checkpoints/round_0003.pt" in text
    assert not list(run_dir.rglob(".fedpath-tmp-*"))


@pytest.mark.slow
def test_report_without_privacy_or_final(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", privacy=False, final=False, rounds=2)
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert "run in progress or interrupted after round 2 of 3" in text
    assert "No site reported a privacy budget" in text
    images = _references(text).images
    assert sorted(images) == ["AUC", "Aggregation weights", "Loss"]  # no ε to plot
    for data in images.values():
        _assert_png(data)


def test_report_before_any_round_and_into_another_folder(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", final=False, rounds=0)
    out = tmp_path / "elsewhere"
    page = render_report(run_dir, out)
    assert page == out / "report.html"
    text = page.read_text(encoding="utf-8")
    assert "interrupted before its first round completed" in text
    assert "No round has completed yet" in text
    assert not (run_dir / "report.html").exists()


@pytest.mark.slow
def test_failed_run_shows_the_reason(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    final = _final() | {
        "status": "failed",
        "reason": "only 1 of 3 sites <answered>",
        "rounds_completed": 2,
        "test": {},
        "global_test": {},
    }
    (run_dir / "final.json").write_text(json.dumps(final))
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert "Run failed after 2 of 3 rounds: only 1 of 3 sites &lt;answered&gt;." in text
    assert "The run ended without test results." in text


def test_run_that_never_started_reports_why(tmp_path: Path) -> None:
    """Harmonisation failed: the ServerApp wrote final.json only, with a multi-line reason."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    reason = "the sites' prepared data do not match:\n  - <b>x</b>: feature_dim is 8, not 16"
    final = _final() | {"status": "failed", "reason": reason, "rounds_completed": 0,
                        "test": {}, "global_test": {}}  # fmt: skip
    (run_dir / "final.json").write_text(json.dumps(final))
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert "Run failed after 0 of 3 rounds: the sites&#39; prepared data do not match:" in text
    assert "  - &lt;b&gt;x&lt;/b&gt;: feature_dim is 8, not 16" in text
    assert "config.json is missing: the run stopped before it started" in text
    assert "No round has completed yet" in text


# -------------------------------------------------------------------------------------------
# CLI.


@pytest.mark.slow
def test_cli_report_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run(tmp_path / "run")
    assert main(["report", str(run_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "report.html" in out and "Completed" in out

    (run_dir / "metrics.jsonl").write_text('{"round": 1, "attempt"\n')
    assert main(["report", str(run_dir)]) == EXIT_USAGE
    assert "metrics.jsonl, line 1: not valid JSON" in " ".join(capsys.readouterr().out.split())

    assert main(["report", str(tmp_path / "missing")]) == EXIT_USAGE


@pytest.mark.slow
def test_resumed_run_with_a_redone_round_and_sparse_site_facts(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", final=False)
    config = json.loads((run_dir / "config.json").read_text())
    config["sites"]["site_a"] = {"encoder": "tiny_cnn", "feature_dim": None}
    (run_dir / "config.json").write_text(json.dumps(config))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([*lines[:2], lines[1], lines[2]]) + "\n")
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert "Round(s) 2 appear on more than one line" in text
    assert "interrupted after round 3 of 3" in text


def test_matplotlib_text_is_literal() -> None:
    assert mpl_text("a$b$") == r"a\$b\$"
    assert mpl_text("_hidden") == " _hidden"


@pytest.mark.slow
def test_client_level_guarantee_and_epsilon_by_round_are_rendered(tmp_path: Path) -> None:
    """final.json's guarantee (what the rounds delivered) wins over config.json's plan, and the
    federation's client-level ε appears per round in the privacy section."""
    from fedpath.server.guarantee import CLIENT_LEVEL, ClientLevelSpent, run_guarantee

    run_dir = make_run(tmp_path / "run", privacy=False)
    lines = []
    for number, raw in enumerate((run_dir / "metrics.jsonl").read_text().splitlines(), 1):
        record = json.loads(raw)
        record["client_dp"] = {
            "epsilon": 2.5 * number,
            "delta": 1e-5,
            "releases": number,
            "clip_norm": 0.5,
            "noise_multiplier": 1.2,
            "noise_std": 0.6 * max(record["weights"].values()),
            "max_weight": max(record["weights"].values()),
            "sample_rate": 1.0,
            "accountant": "opacus-rdp",
            "not_yet_known_field": 1,
        }
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    guarantee = run_guarantee(
        [json.loads(x) for x in lines], ClientLevelSpent(0.5, 1.2, 1e-5, 7.5, 3)
    )
    final = {**_final(), **guarantee}
    (run_dir / "final.json").write_text(json.dumps(final), encoding="utf-8")
    run = read_run(run_dir)
    assert [r.client_dp.epsilon for r in run.rounds] == [2.5, 5.0, 7.5]
    assert run.final.privacy["guarantee"] == CLIENT_LEVEL
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert f'<p class="privacy">{CLIENT_LEVEL}: ε = 7.5 at δ = 1e-05 after 3' in text
    assert PRIVACY_TEXT not in text, "the delivered guarantee replaces the planned one"
    assert "ε of the federation by round" in text and "opacus-rdp" in text
    assert "7.500" in text and "σ·C·max w" in text


@pytest.mark.slow
def test_skipped_slides_are_counted_per_site_and_round(tmp_path: Path) -> None:
    """Bags a site left out reach the report as counts and a warning (never as slide ids)."""
    run_dir = make_run(tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    for record in records:
        for site in record["train"]:
            record["train"][site]["skipped_slides"] = 0.0
        for site in record["evaluate"]:
            record["evaluate"][site]["skipped_slides"] = 0.0
    records[2]["train"]["site_c"]["skipped_slides"] = 2.0
    records[2]["evaluate"]["site_c"]["skipped_slides"] = 1.0
    (run_dir / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8"
    )
    rounds = read_metrics(run_dir)
    assert rounds[2].train["site_c"].skipped_slides == 2.0
    assert rounds[2].evaluate["site_c"].skipped_slides == 1.0
    assert rounds[0].train["site_a"].skipped_slides == 0.0
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert "skipped (train / eval)" in text
    assert '<span class="warn">2 / 1</span>' in text
    assert "round 3, site_c: 2 training/validation and 1 evaluation slide(s)" in text
    assert "round 1, site_c" not in text and "round 3, site_a" not in text
    # A run from before the metric existed shows n/a and no warning.
    plain = render_report(make_run(tmp_path / "old")).read_text(encoding="utf-8")
    assert "failed validation" not in plain


# -------------------------------------------------------------------------------------------
# One self-contained file (issue 20.14).


def _set_run_config(run_dir: Path, **changes: Any) -> None:
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    config["run_config"].update({k.replace("_", "-"): v for k, v in changes.items()})
    config["train_config"].update({"epochs": 2, "patience": 20, "min_epochs": 50,
                                   "stopping_loss": "slide", "grad_clip": None})  # fmt: skip
    (run_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.slow
def test_report_is_one_file_that_opens_alone_and_names_no_local_path(tmp_path: Path) -> None:
    """Mailed on its own: every plot inside the page, nothing loaded from anywhere, and no
    absolute path of the machine that rendered it, although the run's own files name them."""
    run_dir = make_run(tmp_path / "run")
    _set_run_config(
        run_dir,
        runs_dir=str(tmp_path),
        resume=str(tmp_path / "run-before"),
        simulation_data="/srv/federation/sim-sites",
    )
    final = json.loads((run_dir / "final.json").read_text(encoding="utf-8"))
    final["reason"] = f"{run_dir / 'checkpoints' / 'round_0002.pt'}: cannot be read ({run_dir})"
    final["status"] = "failed"
    (run_dir / "final.json").write_text(json.dumps(final), encoding="utf-8")
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "loss.png").write_bytes(b"stale plot of an older fedpath")
    page = render_report(run_dir)
    mailed = tmp_path / "inbox"
    mailed.mkdir()
    shutil.copy(page, mailed / "report.html")
    assert [p.name for p in mailed.iterdir()] == ["report.html"]
    text = (mailed / "report.html").read_text(encoding="utf-8")

    refs = _references(text)
    for tag, attribute, value in refs.references:
        assert value.startswith("data:image/png;base64,"), (tag, attribute, value[:80])
    assert sorted(refs.images) == ["AUC", "Aggregation weights", "Loss", "Privacy spent"]
    for data in refs.images.values():
        _assert_png(data)
    assert re.search(r"url\(|@import|<link|<script|<iframe", text, re.IGNORECASE) is None
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
    assert str(Path.home()) + "/" not in text
    assert "/srv/federation" not in text and "…/sim-sites" in text
    assert "checkpoints/round_0002.pt: cannot be read (run)" in text
    assert '<span class="key">runs-dir</span> ..</div>' in text
    assert '<span class="key">resume</span> ../run-before</div>' in text
    assert not (run_dir / "plots").exists(), "the stale plots of an older report are removed"


def test_path_scrub_rewrites_whole_path_components_only(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "demo"
    scrub = PathScrub(run_dir, home=tmp_path / "home" / "coord")
    runs = tmp_path / "runs"
    assert scrub(f"{run_dir}/final.json") == "final.json"
    assert scrub(f"resume={run_dir}") == "resume=demo"
    assert scrub(f"{runs}/demo-2/final.json") == "../demo-2/final.json"
    assert scrub(f"{runs}") == ".."
    assert scrub(f"{tmp_path}/home/coord/.fedpath") == "~/.fedpath"
    assert scrub(f"/mnt{run_dir}/x") == f"/mnt{run_dir}/x", "not a path of this machine's run"
    assert scrub(f"{runs}x/y") == f"{runs}x/y"


def _unused_table(text: str) -> str:
    start = text.find("did not apply to this run</summary>")
    return text[start : text.index("</details>", start)] if start >= 0 else ""


def _settings_in_effect(text: str) -> str:
    start = text.index("<h2>Run settings</h2>")
    return text[start : text.index("</div></div>", start)]


@pytest.mark.slow
def test_settings_the_run_did_not_use_are_listed_apart_with_the_reason(tmp_path: Path) -> None:
    """FedAvg: no λ/β; DP off: no DP knobs; a federated round never stops early."""
    run_dir = make_run(tmp_path / "fedavg")
    _set_run_config(
        run_dir,
        strategy="fedavg",
        client_dp="off",
        client_dp_clip_norm=1.0,
        dp_noise_multiplier=0.0,
        dp_target_epsilon=0.0,
        dp_max_grad_norm=1.0,
        dp_delta=1e-5,
    )
    text = render_report(run_dir).read_text(encoding="utf-8")
    in_effect, unused = _settings_in_effect(text), _unused_table(text)
    for key in ("fedmix-lambda", "fedmix-beta", "client-dp-clip-norm", "dp-max-grad-norm",
                "dp-delta"):  # fmt: skip
        assert f">{key}<" not in in_effect and f"<td>{key}</td>" in unused, key
    assert "λ and β weigh FedMix only; the strategy is fedavg" in unused
    assert "slide-level DP-SGD is off" in unused and "client-level DP is off" in unused
    assert '<span class="key">local-epochs</span> 2' in in_effect
    training = text[text.index("<h3>Local training") :]
    for key in ("patience", "min_epochs", "stopping_loss"):
        assert f'<span class="key">{key}</span>' not in training
        assert f"<td>{key}</td>" in _unused_table(training)
    assert "no early stopping" in training

    fedmix = make_run(tmp_path / "fedmix")
    _set_run_config(fedmix, dp_noise_multiplier=1.1, dp_target_epsilon=0.0, dp_delta=1e-5)
    text = render_report(fedmix).read_text(encoding="utf-8")
    in_effect = _settings_in_effect(text)
    for key in ("fedmix-lambda", "fedmix-beta", "dp-delta", "dp-noise-multiplier"):
        assert f'<span class="key">{key}</span>' in in_effect, key
        assert f"<td>{key}</td>" not in _unused_table(text)
    assert "<td>dp-target-epsilon</td>" in _unused_table(text)
    assert "σ is given by dp-noise-multiplier" in text
    training = text[text.index("<h3>Local training") :]
    assert "<td>grad_clip</td>" in _unused_table(training)
    assert "slides by Poisson sampling, one slide per forward pass" in training


def test_every_axis_has_a_title_with_its_unit(tmp_path: Path) -> None:
    run = read_run(make_run(tmp_path / "run"))
    made = figures(run, rounds_for_plots(run))
    assert [plot.name for plot, _ in made] == ["loss", "auc", "weights", "epsilon"]
    for plot, fig in made:
        for ax in fig.axes:
            assert ax.get_xlabel() == "federated round (no.)", plot.name
            assert re.fullmatch(r".+ \(.+\)", ax.get_ylabel()), (plot.name, ax.get_ylabel())


@pytest.mark.slow
def test_final_table_shows_every_metric_key_of_final_json(tmp_path: Path) -> None:
    """Metrics and blocks added to final.json later (calibration, intervals, pooled counts)
    appear without a code change: headline metrics in the table, every key listed below it."""
    run_dir = make_run(tmp_path / "run")
    final = json.loads((run_dir / "final.json").read_text(encoding="utf-8"))
    for i, site in enumerate(SITES):
        final["test"][site] |= {"brier": 0.1 + i / 100, "ece": 0.05, "threshold": 0.42,
                                "patch_auc_pooled": 0.777}  # fmt: skip
    final["global_test"] |= {
        "auc_ci": [0.61, 0.97],
        "brand_new_metric": {"value": 0.5},
        "pooling": "pooled over every <test> slide from the sites' counts",
    }
    final["calibration"] = {"temperature": 1.25, "description": "T = 1.25 from val NLL"}
    final["a_future_flag"] = True
    (run_dir / "final.json").write_text(json.dumps(final), encoding="utf-8")
    text = render_report(run_dir).read_text(encoding="utf-8")
    section = text[text.index("<h2>Final test results") : text.index("<h2>Curves")]
    headline = section[: section.index("</table>")]
    assert re.findall(r"<th>([^<]*)</th>", headline) == [
        "site", "slides", "loss", "slide AUC", "patch AUC", "balanced accuracy", "F1",
        "Brier score", "ECE", "threshold",
    ]  # fmt: skip
    assert "0.1100" in headline and '<td class="num">0.4200</td>' in headline
    assert "All sites: pooled over every &lt;test&gt; slide from the sites&#39; counts" in section
    every = section[section.index("Every test metric final.json holds") :]
    assert re.findall(r"<th>([^<]*)</th>", every) == ["metric", *SITES_ESCAPED, "all sites"]
    for header, value in (("patch AUC pooled", "0.7770"), ("AUC CI", "0.6100 – 0.9700"),
                          ("brand new metric", "0.5000")):  # fmt: skip
        assert re.search(f"<td>{header}</td>.*?{value}", every), header
    assert "<h3>calibration</h3>" in section and "T = 1.25 from val NLL" in section
    assert '<span class="key">calibration.temperature</span>' not in section  # flattened
    assert '<span class="key">temperature</span> 1.25' in section
    assert '<span class="key">a_future_flag</span> true' in section


SITES_ESCAPED = ["site_a", "&lt;b&gt;x&lt;/b&gt;", "site_c"]


# -------------------------------------------------------------------------------------------
# Template and data kept apart (issue 22.2).

SCRIPT_SITE = "<script>alert(1)</script>"


@pytest.mark.slow
def test_a_site_named_as_a_script_is_escaped_by_the_template(tmp_path: Path) -> None:
    """Autoescape, not each caller, escapes every value: a site named as markup is text in every
    table, status and note that names it, and the page holds no script element."""
    run_dir = make_run(tmp_path / "run")
    for name in ("config.json", "metrics.jsonl", "final.json"):
        path = run_dir / name
        path.write_text(path.read_text(encoding="utf-8").replace("site_c", SCRIPT_SITE))
    text = render_report(run_dir).read_text(encoding="utf-8")
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert "<script>alert" not in text and "<script" not in text.lower()
    # sites table, per-site table, failure reason, weights, privacy summary, final table
    assert text.count(escaped) >= 6, text.count(escaped)
    assert f'<span class="warn">{escaped}</span>: <span class="reason">timeout' in text

    class Tags(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: set[str] = set()
            self.text: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.tags.add(tag)

        def handle_data(self, data: str) -> None:
            self.text.append(data)

    parsed = Tags()
    parsed.feed(text)
    assert "script" not in parsed.tags
    assert SCRIPT_SITE in "".join(parsed.text), "the name reads as written"


@pytest.mark.slow
def test_the_report_data_modules_load_neither_matplotlib_nor_jinja2() -> None:
    """Computing what the report says is pure data: only ``plots`` draws, only ``page``
    renders HTML."""
    code = (
        "import sys\n"
        "import fedpath.server.report.content, fedpath.server.report.series\n"
        "print(sorted(m for m in ('matplotlib', 'jinja2', 'markupsafe') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.strip() == "[]", out


@pytest.mark.slow
def test_a_site_named_by_a_local_path_is_scrubbed_in_every_sentence(tmp_path: Path) -> None:
    """The path scrub reaches each value the page puts out, also the items of the sentences it
    assembles (the skipped-slides warning), not only table cells and settings."""
    run_dir = make_run(tmp_path / "run")
    local = str(run_dir / "sites" / "c")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records[2]["train"]["site_c"]["skipped_slides"] = 2.0
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    (run_dir / "metrics.jsonl").write_text(text.replace("site_c", local), encoding="utf-8")
    for name in ("config.json", "final.json"):
        path = run_dir / name
        path.write_text(path.read_text(encoding="utf-8").replace("site_c", local))
    page = render_report(run_dir).read_text(encoding="utf-8")
    assert str(tmp_path) not in page and str(tmp_path.resolve()) not in page
    assert "round 3, sites/c: 2 training/validation and 0 evaluation slide(s)" in page
