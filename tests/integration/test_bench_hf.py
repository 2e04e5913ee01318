"""bench/hf_load.py runs end to end at its tiny --quick size: a Llama written by save_pretrained, loaded by
`shardrun train` on 2 ranks at ZeRO 0 and ZeRO 3, each rank's memory read at "engine ready" (its numbers are not
checked: benchmarks are not tests). Marked `bench`, like the other benchmarks' end-to-end checks."""

import sys

import pytest
from helpers import REPO, run

pytestmark = [pytest.mark.bench, pytest.mark.timeout(300)]


def test_hf_load_reads_every_ranks_peak_at_zero_0_and_3():
    out = run([sys.executable, "bench/hf_load.py", "--quick"], timeout=280, cwd=REPO).stdout
    rows = {(cells[0], cells[1]): cells for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines())
            if len(cells) == 11 and cells[0] in ("0", "3")}
    assert set(rows) == {("0", "0"), ("0", "1"), ("3", "0"), ("3", "1")}, out
    for cells in rows.values():
        peak, anon, before, added, built, whole = (float(c.replace(",", "")) for c in cells[2:8])
        assert whole >= peak >= built >= before > 0 and 0 < anon <= peak
        assert added == pytest.approx(peak - before, abs=1)
        assert float(cells[9]) > 0 and float(cells[10]) >= float(cells[9])  # from_pretrained inside the load
    assert "rank 1: ZeRO 3's peak RSS to engine ready is " in out
