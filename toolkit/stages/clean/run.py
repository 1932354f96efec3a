"""`toolkit clean NAME --report / --apply / --dry-run / --undo / --undo-all`: the cleaning stage without
its UI, as one call that returns a JSON-able result and the lines a person reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.core.config import ClassifierSpec
from toolkit.stages.clean.decisions import DecisionLog, apply_decisions
from toolkit.stages.clean.rank import list_raw_images, rank, write_report


def clean_batch(spec: ClassifierSpec, data: Path | None = None, *, report: bool = False, apply: bool = False,
                dry_run: bool = False, undo: bool = False, undo_all: bool = False, size: int = 128,
                with_model: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Undo, then rank (--report), then apply or dry-run, in that order; (result, text lines)."""
    log = DecisionLog(spec.cleaned_dir)
    result: dict[str, Any] = {}
    lines: list[str] = []
    if undo_all:
        result["undone"] = log.undo_all()
        lines.append(f"undid {result['undone']} decision(s)")
    elif undo:
        undone = log.undo()
        result["undone"] = undone
        lines.append(f"undid {undone['action']} {undone['file']}" if undone else "nothing to undo")
    if report:
        rankings = rank(spec, data, size=size, with_model=with_model)
        written = write_report(rankings, spec.cleaned_dir)
        summary = rankings.summary()
        result["report"] = summary
        lines.append(f"{len(summary['label_issues'])} label issues, {len(summary['duplicates'])} duplicate groups, "
                     f"{len(summary['outliers'])} outliers, {len(rankings.broken)} broken; "
                     f"wrote {written['json']} and CSVs beside it")
    if apply or dry_run:
        applied = apply_decisions(list_raw_images(spec, data), log, dry=dry_run)
        result["apply"] = applied
        if dry_run:
            lines.append(f"apply would add {len(applied['add'])}, remove {len(applied['remove'])} and move "
                         f"{len(applied['move'])} file(s)")
            lines += [f"  {kind} {' -> '.join(item) if isinstance(item, list) else item}"
                      for kind in ("add", "remove", "move") for item in applied[kind]]
        else:
            lines.append(f"applied: {applied['kept']} images in {applied['folder']} ({applied['deleted']} deleted, "
                         f"{applied['relabelled']} relabelled; {applied['linked']} hard links, "
                         f"{applied['copied']} copies)")
    # one document: the report alone (as before) when only --report was asked, else every part
    if set(result) == {"report"}:
        return result["report"], lines
    if set(result) == {"apply"}:
        return result["apply"], lines
    return result, lines
