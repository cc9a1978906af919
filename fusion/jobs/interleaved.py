"""Interleaved documents as files a person can read: a Markdown page with the PNGs, and one
JSON line per document (scripts/sample.py task=interleaved, scripts/evaluate.py interleaved)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def write_interleaved(out: Path, prompts: Sequence[str], documents: Sequence[Sequence],
                      stopped: Sequence[str], scores: dict | None = None
                      ) -> tuple[Path, list[dict]]:
    """Documents (str texts and uint8 (H, W, 3) images in order, the prompt first) ->
    ``<out>/interleaved.md`` (each document's text, its images inline, why it stopped),
    ``<out>/images/DDDDD_K.png`` and ``<out>/interleaved.jsonl`` (per document: prompt,
    segments as {"text"} or {"image": file}, stopped). Returns the page's path and the
    records."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = ["# Interleaved generation", ""]
    if scores:
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in scores.items() if isinstance(v, int | float)]
        lines.append("")
    records = []
    for d, (prompt, doc, stop) in enumerate(zip(prompts, documents, stopped, strict=True)):
        lines += [f"## {d + 1}. {prompt}", ""]
        segments, k = [], 0
        for piece in doc[1:]:  # the prompt is the heading
            if isinstance(piece, str):
                if piece.strip():
                    lines += [piece.strip(), ""]
                segments.append({"text": piece})
            else:
                name = f"images/{d:05d}_{k}.png"
                Image.fromarray(np.asarray(piece)).save(out / name)
                lines += [f"![image {k + 1}]({name})", ""]
                segments.append({"image": name})
                k += 1
        lines += [f"*stopped: {stop}*", ""]
        records.append({"prompt": prompt, "segments": segments, "stopped": stop})
    (out / "interleaved.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = out / "interleaved.md"
    page.write_text("\n".join(lines))
    return page, records
