"""The quick cases of `make chaos` (benchmarks/chaos.py), at a small scale: the same scenario
code, real redis-server and real worker processes."""

from __future__ import annotations

import pytest

from benchmarks import chaos
from tests.redis_helpers import require_redis


# duplicate-id runs in make chaos; its quick reproduction is in test_worker_faults.
@pytest.mark.parametrize("name", ["load", "bad-input"])
def test_chaos_scenario(name, tmp_path):
    require_redis()
    row = chaos.run(name, str(tmp_path), scale=0.05)
    assert row["ok"], row
    assert row["lost"] == row["dup_results"] == row["dup_events"] == 0, row
    assert row["completed"] >= 1, row
