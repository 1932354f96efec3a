"""`toolkit` commands. The data stages: scrape and clean."""

from __future__ import annotations

import argparse
from pathlib import Path

from toolkit.cli.base import BIND, NAME, arg, command, emit, log, out, spec_of
from toolkit.core.errors import ToolkitError


@command("scrape", NAME,
         arg("--source", help="ddgs, folder:PATH, urls:FILE (class<TAB>url lines), fashion-mnist[:DIR] (default: "
             "the section's source key; auto = fashion-mnist for [fashion-mnist], else ddgs)"),
         arg("--classes", help="comma-separated classes to scrape (default: all of the section's)"),
         arg("--per-class", type=int, help="accepted images per class (default: per_class)"),
         arg("--add-class", help="add this class to the section's classes in settings.ini and scrape it"),
         arg("--workers", type=int, default=32, help="downloads in flight at once (default 32)"),
         arg("--test-split", action="store_true", help="also write the test images to scrape/NAME-test/"),
         arg("--test-per-class", type=int, default=None))
def cmd_scrape(args: argparse.Namespace) -> int:
    """Fill scrape/NAME/<class>/ from ddgs search, folder:PATH, urls:FILE or fashion-mnist[:DIR]."""
    from toolkit.stages.scrape.section import scrape_section

    report, result, folder = scrape_section(args.settings, args.name, source=args.source, classes=args.classes,
                                    per_class=args.per_class, add_class=args.add_class, workers=args.workers,
                                    test_split=args.test_split, test_per_class=args.test_per_class,
                                    progress=not args.quiet, log=log)
    return emit(args, result, [report.format(), f"scraped into {folder} (provenance: {folder / 'manifest.jsonl'})"])


@command("clean", NAME, arg("--data", type=Path, help="raw class folders (default: the data key, else scrape/NAME)"),
         arg("--report", action="store_true", help="write the rankings as CSV and JSON, no UI"),
         arg("--apply", action="store_true", help="materialise cleaned_data/NAME from the decisions"),
         arg("--dry-run", action="store_true", help="show what --apply would change"),
         arg("--undo", action="store_true", help="undo the last decision of one session (default: the one that "
             "decided last; it is printed)"), arg("--undo-all", action="store_true", help="undo all of one session's"),
         arg("--session", help="with --undo/--undo-all: the session whose decisions to undo"),
         arg("--size", type=int, default=None, help="with --report: embedding image size (default: the section's "
             "clean_size, 160; set clean_size in settings.ini to give the app the same size)"),
         arg("--no-model", action="store_true", help="skip top losses even if models/NAME exists"),
         arg("--processes", type=int, default=1, help="with --report: embed new images in N processes (default 1)"),
         *BIND)
def cmd_clean(args: argparse.Namespace) -> int:
    """Rank and clean a classifier's raw images: the Voila widget, --report [--json] or --apply."""
    from toolkit.core.config import parse_embedding_size
    from toolkit.stages.clean.run import clean_batch
    from toolkit.ui.serve import serve_cleaner

    if args.processes < 1:
        raise ToolkitError("clean --processes needs 1 or more")
    if args.size is not None:
        try:
            parse_embedding_size(str(args.size))
        except ValueError as error:
            raise ToolkitError(f"clean --size {error}") from None
    spec = spec_of(args)
    if not (args.report or args.apply or args.dry_run or args.undo or args.undo_all):
        return serve_cleaner(spec, Path(args.settings).resolve(), args.data, args.host, args.port, out=out,
                             token=not args.no_token, allowed_hosts=args.allow_host or ())
    result, lines, code = clean_batch(spec, args.data, report=args.report, apply=args.apply, dry_run=args.dry_run,
                                      undo=args.undo, undo_all=args.undo_all, session=args.session, size=args.size,
                                      with_model=not args.no_model, processes=args.processes, warn=log)
    return emit(args, result, lines, code)
