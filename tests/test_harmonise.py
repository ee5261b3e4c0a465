"""The harmonisation gate names each disagreeing site and field."""

from __future__ import annotations

import pytest

from server.harmonise import HarmonisationError, SiteFacts, check_harmonised

LABELS = ("normal", "tumour")


def _facts(site: str, **changes: object) -> SiteFacts:
    facts = {
        "site": site,
        "encoder": "efficientnet_lite0",
        "encoder_sha256": "a" * 64,
        "feature_dim": 1280,
        "target_mpp": 0.5,
        "patch_size": 256,
        "labels": list(LABELS),
        "slides": {"usable": 10},
    }
    facts.update(changes)
    return SiteFacts(site, facts)


def test_matching_sites_pass() -> None:
    check_harmonised([_facts("a"), _facts("b"), _facts("c")], LABELS)


def test_each_disagreeing_site_and_field_is_named() -> None:
    sites = [
        _facts("a"),
        _facts("b", encoder_sha256="b" * 64),
        _facts("c", target_mpp=1.0, feature_dim=1024),
    ]
    with pytest.raises(HarmonisationError) as info:
        check_harmonised(sites, LABELS)
    problems = info.value.problems
    assert len(problems) == 3
    assert any(p.startswith("b: encoder_sha256") and "a, c have" in p for p in problems)
    assert any(p.startswith("c: target_mpp is 1.0") for p in problems)
    assert any(p.startswith("c: feature_dim is 1024, but a, b have 1280") for p in problems)
    assert "the run was not started" in str(info.value)


def test_labels_empty_sites_and_duplicate_names() -> None:
    sites = [
        _facts("a", labels=["benign", "tumour"]),
        _facts("b", slides={"usable": 0}),
        _facts("b"),
    ]
    with pytest.raises(HarmonisationError) as info:
        check_harmonised(sites, LABELS)
    text = str(info.value)
    assert "a: labels are ['benign', 'tumour']" in text
    assert "b: has no usable prepared slides" in text
    assert "more than one connected node calls itself 'b'" in text


def test_no_site_at_all() -> None:
    with pytest.raises(HarmonisationError, match="no site answered"):
        check_harmonised([], LABELS)
