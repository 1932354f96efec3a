"""The stages, one module (or package) each: scrape, clean, train, evaluate, sweep, explain, check."""
