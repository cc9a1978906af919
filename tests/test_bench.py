"""scripts/bench.py sampling runs and reports cached == uncached images (no speed asserted)."""

import re

from fusion.benchmarks.sampling import main


def test_sampling_benchmark_reports_both_paths_and_their_agreement(capsys):
    main(["--batch", "2", "--steps", "2", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split() and line.split()[0] == "2")
    steps, cached, uncached, speedup, diff = row.split()
    assert float(cached) > 0 and float(uncached) > 0
    assert re.fullmatch(r"[0-9.]+x", speedup)
    assert float(diff) < 1e-3  # the cache changes speed, not the image
