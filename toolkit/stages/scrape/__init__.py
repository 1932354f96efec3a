"""toolkit scrape: search backends, bounded downloads, dedupe, a provenance manifest, resume."""
