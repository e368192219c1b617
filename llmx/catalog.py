"""What `llmx list` and `llmx show` say about the recipes: one line per recipe, grouped by paper (or kind), cut to
the terminal's width, and a recipe's full description (the comment block at the top of its YAML file) with its
measured time on 2 CPU cores. Reads the recipe files only (llmx.config.compose.list_recipes): no Hydra, no torch,
so both answer at once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from llmx.utils import LlmxError

GROUP_BY = ("paper", "kind")
GENERAL = "llmx (no paper)"


def paper_group(paper: str) -> str:
    """A recipe's paper without its qualifier: "GaLore 2 (AdamW baseline)" lists under "GaLore 2"."""
    return re.sub(r"\s*\(.*\)\s*$", "", paper or "").strip() or GENERAL


def select(rows: Iterable[dict], kind: Optional[str] = None, paper: Optional[str] = None,
           cpu: bool = False) -> List[dict]:
    """The recipes matching every filter given; an unknown kind or a paper no recipe names is refused with the
    valid values (an empty list would read as "llmx has none")."""
    rows = list(rows)
    if kind is not None:
        kinds = sorted({str(r["kind"]) for r in rows})
        if kind not in kinds:
            raise LlmxError(f"--kind {kind!r}: no recipe of that kind; kinds: {', '.join(kinds)}")
        rows = [r for r in rows if str(r["kind"]) == kind]
    if paper is not None:
        papers = sorted({paper_group(r["paper"]) for r in rows})
        matched = [r for r in rows if paper.lower() in (r["paper"] or GENERAL).lower()]
        if not matched:
            raise LlmxError(f"--paper {paper!r} matches no recipe's paper; papers: {', '.join(papers)}")
        rows = matched
    if cpu:
        rows = [r for r in rows if r["fits_cpu"]]
    return rows


def _cut(text: str, width: Optional[int], ellipsis: str) -> str:
    if width is None or len(text) <= width:
        return text
    if width <= len(ellipsis):
        return text[:max(width, 0)]
    return text[:width - len(ellipsis)].rstrip() + ellipsis


def render_list(rows: Iterable[dict], width: Optional[int] = None, by: str = "paper",
                ellipsis: str = "…") -> str:
    """One heading per group, one line per recipe: name, kind (or paper), cpu or gpu, description cut to `width`
    columns (None: never cut). Columns align within a group, so that a long name elsewhere costs no group its
    description. Names are never cut: they are copied into commands."""
    if by not in GROUP_BY:
        raise LlmxError(f"--by {by!r}; valid: {', '.join(GROUP_BY)}")
    other = "kind" if by == "paper" else "paper"
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        key = paper_group(r["paper"]) if by == "paper" else str(r["kind"])
        groups.setdefault(key, []).append(r)
    lines = []
    order = sorted(groups, key=lambda g: (g == GENERAL, g.lower()))
    for g in order:
        members = sorted(groups[g], key=lambda r: r["name"])
        cols = [str(r["kind"]) if other == "kind" else (r["paper"] and paper_group(r["paper"])) or "-"
                for r in members]
        name_w, col_w = max(len(r["name"]) for r in members), max(map(len, cols))
        lines.append(g if width is None else _cut(g, width, ellipsis))
        for r, col in zip(members, cols):
            head = f"  {r['name']:<{name_w}}  {col:<{col_w}}  {'cpu' if r['fits_cpu'] else 'gpu'}  "
            room = None if width is None else width - len(head)
            lines.append((head + _cut(r["description"], room, ellipsis)).rstrip())
    return "\n".join(lines)


def recipe_comment(path) -> List[str]:
    """The comment block at the top of a recipe file (after `# @package`), the recipe's long description."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("# @package"):
            continue
        if not line.startswith("#"):
            break
        out.append(line[1:].removeprefix(" "))
    return out


def describe(row: dict) -> str:
    """`llmx show`'s header for one recipe, as YAML comments so that the output still parses."""
    runs = "fits 2 CPU cores" if row["fits_cpu"] else "needs GPUs"
    lines = [f"{row['name']}: {row['kind']}, {row['paper'] or 'no paper'}, {runs}",
             *([f"measured time on CPU: {row['cpu_time']}"] if row["fits_cpu"] and row.get("cpu_time") else []),
             row["description"], "", *recipe_comment(row["path"])]
    return "\n".join(("# " + line).rstrip() for line in lines) + "\n"
