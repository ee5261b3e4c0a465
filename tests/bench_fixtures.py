"""The tiny synthetic cohort the benchmark tests share (built once per session, conftest.py).

Two hospitals of four pool and two test slides at the ``tiny_cnn`` encoder: heterogeneous
tumour (both grades in pool and test) and the benign mimic on every slide, so the accuracy,
federated accuracy and privacy benchmarks all have what they score.
"""

from __future__ import annotations

from bench.cohorts import LOW_GRADE_SHARE, CohortSpec, HospitalSpec

TINY = CohortSpec(
    hospitals=tuple(
        HospitalSpec(
            name=name,
            stain=stain,
            n_pool=4,
            n_test=2,
            width_range=(1536, 1792),
            height_range=(1280, 1536),
        )
        for name, stain in (("site_a", "reference"), ("site_b", "purple"))
    ),
    tumour_fraction_range=(0.2, 0.6),
    low_grade_share_range=LOW_GRADE_SHARE,
    mimic_share_range=(0.05, 0.15),  # on every slide: the describe line shows both shares
    encoder="tiny_cnn",
    bank_size=256,
)
