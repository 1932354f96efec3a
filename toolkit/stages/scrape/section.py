"""`toolkit scrape NAME`: one section of settings.ini scraped, as the command line asks (classes,
a class to add, a quota, the Fashion-MNIST test split)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.core.errors import ToolkitError
from toolkit.settings import load_settings
from toolkit.stages.scrape import add_class_to_settings, fashion_mnist, load_manifest, resolve_source, scrape


def scrape_section(settings_path: Path, name: str, *, source: str | None = None, classes: str | None = None,
                   per_class: int | None = None, add_class: str | None = None, workers: int = 32,
                   test_split: bool = False, test_per_class: int | None = None, progress: bool = True,
                   log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any], Path]:
    """Scrape [name]; returns the report, its JSON-able summary and the folder scraped into."""
    settings = load_settings(settings_path)
    spec = settings.get(name)
    for flag, value in (("--workers", workers), ("--per-class", per_class), ("--test-per-class", test_per_class)):
        if value is not None and value <= 0:
            raise ToolkitError(f"{flag} {value}: must be a positive whole number")
    if test_per_class is not None and not test_split:
        raise ToolkitError("--test-per-class: give it with --test-split (the test images it counts)")
    wanted = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if classes is not None and not wanted:
        raise ToolkitError("--classes: give comma-separated class names, e.g. --classes cats,dogs")
    if add_class:
        existing = spec.classes or sorted({r["class"] for r in load_manifest(spec.scrape_dir)})
        if add_class_to_settings(settings.path, spec.name, add_class, existing):
            log(f"added class {add_class.strip()!r} to [{spec.name}] in {settings.path}")
            spec = load_settings(settings.path).get(name)
        wanted = [add_class.strip()]
    source = resolve_source(spec, source)
    if test_split and not source.startswith("fashion-mnist"):
        raise ToolkitError(f"--test-split: only the fashion-mnist source has a test split, not {source}")
    report = scrape(spec, source=source, classes=wanted, per_class=per_class, progress=progress, workers=workers,
                    log=log)
    result = report.as_dict()
    if test_split:
        folder = Path(source.split(":", 1)[1]) if ":" in source else fashion_mnist.FASHION_MNIST_DIR
        test_dir = spec.paths.scrape(f"{spec.name}-test")
        counts = fashion_mnist.ingest(test_dir, split="test", per_class=test_per_class, seed=spec.seed,
                                      folder=folder, progress=progress)
        result["test_images"] = sum(counts.values())
        log(f"test images: {sum(counts.values())} in {test_dir}")
    return report, result, spec.scrape_dir
