"""toolkit scrape: search backends, bounded downloads, dedupe, a provenance manifest, resume.

sources.py (ddgs, folder:, urls:, fashion-mnist glue), http.py (checked, pinned, bounded fetching),
manifest.py (manifest repair and appends, lock, quarantine), dedupe.py (seen URLs and hashes),
run.py (the `scrape` run and its report), fashion_mnist.py (the Fashion-MNIST data set).
"""

from toolkit.stages.scrape.manifest import ScrapeError, load_manifest
from toolkit.stages.scrape.run import ClassReport, ScrapeReport, add_class_to_settings, scrape
from toolkit.stages.scrape.sources import resolve_source

__all__ = ["ClassReport", "ScrapeError", "ScrapeReport", "add_class_to_settings", "load_manifest", "resolve_source",
           "scrape"]
