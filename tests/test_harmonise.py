"""The harmonisation gate names each disagreeing site and field."""

from __future__ import annotations

import pytest

from fedpath.server.harmonise import HarmonisationError, SiteFacts, check_harmonised

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
    assert (
        "b: embedded with efficientnet_lite0 (sha256 bbbbbbbb…, 1280-d), but a embedded with "
        "efficientnet_lite0 (sha256 aaaaaaaa…, 1280-d): the same encoder with other weights "
        "(another download or version of the file?)" in problems
    )
    assert any(p.startswith("c: target_mpp is 1.0") for p in problems)
    assert (
        "c: embedded with efficientnet_lite0 (sha256 aaaaaaaa…, 1024-d), but a embedded with "
        "efficientnet_lite0 (sha256 aaaaaaaa…, 1280-d)" in problems
    )
    assert "the run was not started" in str(info.value)


def test_sites_with_different_encoders_are_named_by_registry_id() -> None:
    """One line per odd site naming both encoders by id, weights hash and width; it used to be
    three lines of raw field values (encoder, encoder_sha256 cut mid-hash, feature_dim)."""
    uni = {"encoder": "uni", "encoder_sha256": "ab12cd34" + "0" * 56, "feature_dim": 1024}
    virchow = {"encoder": "virchow2", "encoder_sha256": "9f3a" + "1" * 60, "feature_dim": 2560}
    sites = [_facts("a", **uni), _facts("b", **virchow), _facts("c", **uni)]
    with pytest.raises(HarmonisationError) as info:
        check_harmonised(sites, LABELS)
    assert info.value.problems == [
        "b: embedded with virchow2 (sha256 9f3a1111…, 2560-d), but a, c embedded with uni "
        "(sha256 ab12cd34…, 1024-d)"
    ]


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
