"""`toolkit clean NAME --report / --apply / --dry-run / --undo / --undo-all`: the cleaning stage without
its UI, as one call that returns a JSON-able result and the lines a person reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.core.config import ClassifierSpec
from toolkit.stages.clean.decisions import DecisionLog, apply_decisions, undo_report
from toolkit.stages.clean.rank import list_raw_images, rank, write_report


def clean_batch(spec: ClassifierSpec, data: Path | None = None, *, report: bool = False, apply: bool = False,
                dry_run: bool = False, undo: bool = False, undo_all: bool = False, session: str | None = None,
                size: int | None = None, with_model: bool = True, processes: int = 1,
                warn: Callable[[str], None] = lambda line: None) -> tuple[dict[str, Any], list[str], int]:
    """Undo (one session's: `session`, default the one that decided last), then rank (--report), then
    apply or dry-run, in that order; (result, text lines, exit code: 1 when decisions were refused)."""
    log = DecisionLog(spec.cleaned_dir)
    result: dict[str, Any] = {}
    lines: list[str] = []
    status = 0
    if undo or undo_all:
        result["undo"] = undo_report(log, session, everything=undo_all)
        lines += result["undo"]
    if report:
        rankings = rank(spec, data, size=size, with_model=with_model, processes=processes)
        written = write_report(rankings, spec.cleaned_dir)
        for warning in rankings.warnings:
            warn(f"warning: {warning}")
        summary = rankings.summary()
        result["report"] = summary
        lines.append(f"{len(summary['label_issues'])} label issues, {len(summary['duplicates'])} duplicate groups, "
                     f"{len(summary['outliers'])} outliers, {len(rankings.broken)} broken, "
                     f"{len(summary['quality'])} image-quality issues, {len(summary['confusion'])} confused pairs; "
                     f"wrote {written['json']} and CSVs beside it")
    if apply or dry_run:
        applied = apply_decisions(list_raw_images(spec, data), log, dry=dry_run)
        result["apply"] = applied
        for line in applied["refused"]:
            warn(f"{'would refuse' if dry_run else 'refused'}: {line}")
        status = 1 if applied["refused"] and not dry_run else 0
        if dry_run:
            lines.append(f"apply would add {len(applied['add'])}, remove {len(applied['remove'])} and move "
                         f"{len(applied['move'])} file(s)")
            lines += [f"  {kind} {' -> '.join(item) if isinstance(item, list) else item}"
                      for kind in ("add", "remove", "move") for item in applied[kind]]
        else:
            lines.append(f"applied: {applied['kept']} images in {applied['folder']} ({applied['deleted']} deleted, "
                         f"{applied['relabelled']} relabelled; {applied['copied']} copies, "
                         f"{applied['reflinked']} of them reflinks)")
    # one document: the report alone (as before) when only --report was asked, else every part
    if set(result) == {"report"}:
        return result["report"], lines, status
    if set(result) == {"apply"}:
        return result["apply"], lines, status
    return result, lines, status
