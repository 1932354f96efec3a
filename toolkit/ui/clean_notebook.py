"""apps/clean.ipynb: a thin notebook over CleanerWidget, generated here so it can be refreshed."""

from __future__ import annotations

from pathlib import Path

CLEAN_SOURCE = '''\
import os

from toolkit.ui.clean_start import start_cleaner  # paints at once; CleanerWidget ranks in the background

start_cleaner(os.environ.get("TOOLKIT_CLASSIFIER"), os.environ.get("TOOLKIT_SETTINGS"), os.environ.get("TOOLKIT_DATA"));
'''


def clean_notebook():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Clean a data set\nMark images to keep, delete or relabel; "
                                              "decisions go to `cleaned_data/NAME/decisions.jsonl`."),
                nbformat.v4.new_code_cell(CLEAN_SOURCE)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["title"] = "the cleaning app"  # the page title and its loading state ("Loading the cleaning app...")
    return nb


def write_clean_notebook(path: str | Path) -> Path:
    """(Re)write apps/clean.ipynb."""
    import nbformat

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(clean_notebook(), str(path))
    return path
