"""The DAS-vs-naive comparison at matched domain loss."""

from __future__ import annotations

import pytest
from softmask_bench import das_report


def test_at_domain_loss_interpolates_and_flags_extrapolation():
    points = [(6.0, 5.0), (5.0, 5.2)]
    assert das_report.at_domain_loss(points, 5.5) == (pytest.approx(5.1), False)
    assert das_report.at_domain_loss(points, 4.5) == (pytest.approx(5.3), True)
    assert das_report.at_domain_loss([(5.0, 1.0), (5.0, 2.0)], 5.0) is None


def test_matched_comparison_reads_the_final_stages():
    def stage(d: float, general: float, cos: float) -> dict:
        return {"loss": {"a": d - 0.5, "b": d + 0.5, "general": general}, "probe_cosine": cos}

    result = {
        "domains": ["a", "b"],
        "methods": {
            "naive": [stage(9.0, 9.0, 0.0), stage(5.0, 5.4, 0.5)],
            "naive lr 5e-05": [stage(6.0, 5.0, 0.9)],
            "das": [stage(5.5, 5.1, 0.8)],
        },
    }
    m = das_report.matched_comparison(result)
    assert m["mean_domain_loss"] == pytest.approx(5.5) and not m["extrapolated"]
    assert m["general"] == {"das": 5.1, "naive": pytest.approx(5.2)}
    assert m["probe_cosine"] == {"das": 0.8, "naive": pytest.approx(0.7)}
    del result["methods"]["naive lr 5e-05"]
    assert das_report.matched_comparison(result) is None
