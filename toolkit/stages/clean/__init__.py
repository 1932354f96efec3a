"""Cleaning: rank suspicious images (label issues, top losses, duplicates, outliers, broken files),
record keep / delete / relabel decisions as data, and materialise cleaned_data/NAME/ from them.

Raw files under scrape/NAME are only ever read. Modules: `embeddings`, `rank`, `decisions`,
`widget`, `notebook`.
"""
