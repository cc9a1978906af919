"""scripts/bench.py: the sampling and train-step benchmarks run and report (no speed asserted)."""

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


def test_train_step_benchmark_times_every_case(capsys):
    from fusion.benchmarks.train_step import main as train_step

    train_step(["--pack-len", "0", "64", "--backends", "auto", "--batches", "1", "--warmup", "0",
                "--rounds", "1"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == ["max_seq_len", "64"]  # header, then the cases
    assert all(float(r[2]) > 0 for r in rows[1:]) and rows[1][3].strip() == "1.00x"
