"""The claim table and plot (``tools/plot_claims.py``) from ``tools/results/claims.json``."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import plot_claims  # noqa: E402

CLAIMS = os.path.join(os.path.dirname(__file__), "..", "tools", "results", "claims.json")


def test_every_recorded_claim_has_a_verdict_and_two_arms_over_three_seeds_or_more():
    claims = plot_claims.load(CLAIMS)
    assert {c["method"] for c in claims} == {"DWGL", "OICSR", "GSM", "CATRO", "CURL"}
    for c in claims:
        assert isinstance(c["holds"], bool) and len(c["arms"]) >= 2, c["claim"]
        assert all(a["n"] >= 3 and a["std"] >= 0 for a in c["arms"]), c["claim"]


def test_the_table_says_which_claims_hold_and_the_plot_is_drawn(tmp_path):
    claims = [{"method": "M", "claim": "beats l2", "setting": "s", "metric": "accuracy", "holds": False,
               "verdict": "a tie", "arms": [{"name": "M", "mean": 0.9, "std": 0.01, "n": 3},
                                            {"name": "l2", "mean": 0.91, "std": 0.02, "n": 3}]},
              {"method": "N", "claim": "removes more", "setting": "s", "metric": "channels", "holds": True,
               "arms": [{"name": "N", "mean": 51.3, "std": 2.5, "n": 3}, {"name": "lasso", "mean": 6.3, "std": 5.9, "n": 3}]}]
    rows = plot_claims.table(claims).splitlines()[2:]
    assert "M 0.900 ± 0.010; l2 0.910 ± 0.020" in rows[0] and "does not hold (a tie)" in rows[0]
    assert "N 51.3 ± 2.5; lasso 6.3 ± 5.9" in rows[1] and rows[1].rstrip(" |").endswith("holds")
    pytest.importorskip("matplotlib")   # a tools extra
    out = tmp_path / "claims.png"
    plot_claims.plot(claims, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
