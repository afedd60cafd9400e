"""Reject delivery under faults: the real `python -m edge run` process against a real mosquitto.

The scenarios live in tests/faults.py (shared with scripts/fault_table.py, which prints them as a
table); each one checks its own expectations and reports failed ones in Outcome.problems: among
them, that no defective or unverified (NaN output, failed inference) part got a `pass` result and
that every poisoned part's reject says `reason: unverified`.
"""

from __future__ import annotations

import pytest

from tests.faults import SCENARIOS, Skip, run_scenario


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_no_reject_lost(name, tmp_path):
    try:
        out = run_scenario(name, tmp_path)
    except Skip as exc:
        pytest.skip(str(exc))
    detail = f"{out.as_dict()}\nstation logs and spool under {tmp_path / name}"
    assert out.problems == [], detail
    # Every loss is loud: the expected alarm appeared (status topic, station or gate counters).
    assert out.alarmed, detail
    assert out.lost_unalarmed == 0, detail
    assert out.lost == 0, detail
    # Every defective or unverified part was rejected: received by the gate or counted as not
    # stored (spool full), none missing.
    assert out.sent > 0 and out.received + out.not_stored == out.sent, detail
