"""The README's main command, end to end with the debug config, and stage reuse."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path) -> str:
    proc = subprocess.run([sys.executable, "scripts/demo.py", "debug=default",
                           f"output_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_demo_runs_and_reuses_finished_stages(tmp_path):
    out = tmp_path / "demo"
    first = _run(out)
    for name in ("results.md", "results.json", "shapes_grid.png", "stages.json",
                 "text_tokenizer/tokenizer.json"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    assert results["detector_exact_recovery"] >= 0.99
    table = (out / "results.md").read_text()
    assert table.strip() in first  # the printed table is the written one
    assert "reused" not in first
    second = _run(out)
    assert second.count("reused") == 3
    # a changed setting redoes the stages it touches, and only those
    proc = subprocess.run([sys.executable, "scripts/demo.py", "debug=default",
                           f"output_dir={out}", "demo.grid_images=4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[text_tokenizer] reused" in proc.stdout
    assert "[shapes_preview] reused" not in proc.stdout
