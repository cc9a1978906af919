"""Prompt files in GenEval's ``evaluation_metadata.jsonl`` format.

One JSON object per line: ``{"tag", "include": [{"class", "count", ["color"],
["position": [relation, index]]}], ["exclude": [{"class", "count"}]], "prompt"}``
(Ghosh et al. 2023, arXiv:2310.11513). GenEval's own file and the ShapesWorld prompt sets that
``scripts/make_shapes.py`` writes go through the same reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fusion.data.shapes import RELATIONS, TAGS, ShapesWorld


@dataclass(frozen=True)
class PromptRecord:
    tag: str
    prompt: str
    include: tuple[dict, ...]
    exclude: tuple[dict, ...] = ()
    extra: dict = field(default_factory=dict)  # keys beyond GenEval's, kept on round trips

    def to_json(self) -> dict:
        row = {"tag": self.tag, "include": [dict(c) for c in self.include]}
        if self.exclude:
            row["exclude"] = [dict(c) for c in self.exclude]
        row["prompt"] = self.prompt
        row.update(self.extra)
        return row


def _check_clause(clause: object, where: str, n_include: int) -> dict:
    if not isinstance(clause, dict):
        raise ValueError(f"{where}: a clause must be an object, got {clause!r}")
    if not isinstance(clause.get("class"), str) or not clause["class"]:
        raise ValueError(f"{where}: clause {clause} has no 'class'")
    count = clause.get("count", 1)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"{where}: clause {clause} has a bad 'count' {count!r}")
    if "position" in clause:
        pos = clause["position"]
        if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                or not isinstance(pos[1], int) or not 0 <= pos[1] < n_include):
            raise ValueError(f"{where}: bad 'position' {pos!r}; expected [relation, index] with "
                             f"relation in {RELATIONS}")
    return clause


def parse_prompt(row: object, where: str = "prompt") -> PromptRecord:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("tag", "prompt", "include"):
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r}")
    if row["tag"] not in TAGS:
        raise ValueError(f"{where}: unknown tag {row['tag']!r}; expected one of {TAGS}")
    include = row["include"]
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}: 'include' must be a non-empty list")
    inc = tuple(_check_clause(c, where, len(include)) for c in include)
    exc = tuple(_check_clause(c, where, len(include)) for c in row.get("exclude", []))
    extra = {k: v for k, v in row.items() if k not in ("tag", "prompt", "include", "exclude")}
    return PromptRecord(row["tag"], row["prompt"], inc, exc, extra)


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """Read a GenEval-format prompt file; a malformed line fails with its line number."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from err
            records.append(parse_prompt(row, f"{path}:{n}"))
    return records


def write_prompts(records: Iterable[PromptRecord], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec.to_json()) + "\n")
    return path


# GenEval's prompt counts per tag, used as the default caps for ShapesWorld prompt sets.
GENEVAL_TAG_COUNTS = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                      "position": 100, "color_attr": 100}


def shapes_prompt_set(world: ShapesWorld, start: int = 0, max_scenes: int = 20000,
                      per_tag: dict[str, int] | None = None) -> list[PromptRecord]:
    """Distinct ShapesWorld prompts per GenEval tag, in GenEval's format and tag order.

    Each record keeps ``shapes_index``: a scene that satisfies it, so ground-truth renders of a
    prompt set can be scored. ShapesWorld has fewer distinct prompts than GenEval for some tags
    (5 single-object prompts, 15 counting prompts), so those tags come out smaller.
    """
    caps = dict(GENEVAL_TAG_COUNTS if per_tag is None else per_tag)
    seen: dict[str, dict[str, PromptRecord]] = {t: {} for t in TAGS}
    for index in range(start, start + max_scenes):
        for tag, row in world.prompts(index).items():
            bucket = seen[tag]
            if len(bucket) < caps.get(tag, 0) and row["prompt"] not in bucket:
                bucket[row["prompt"]] = parse_prompt({**row, "shapes_index": index})
        if all(len(seen[t]) >= caps.get(t, 0) for t in TAGS):
            break
    return [rec for tag in TAGS for rec in seen[tag].values()]
