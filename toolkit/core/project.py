"""Every project path in one place: settings.ini's folder is the project root, and beside it

    scrape/NAME/         raw images + manifest.jsonl (never modified by cleaning or training)
    cleaned_data/NAME/   decisions.jsonl + the cleaned data set derived from it
    models/NAME/         the trained model, its metrics and plots
    feedback/NAME/       what dashboard users said the right label was
    apps/                the Voila notebooks
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SETTINGS_ENV = "TOOLKIT_SETTINGS"
SETTINGS_FILE = "settings.ini"


@dataclass(frozen=True)
class ProjectPaths:
    """The folders of a project rooted at `root` (the settings file's folder)."""

    root: Path

    def scrape(self, name: str) -> Path:
        return self.root / "scrape" / name

    def cleaned(self, name: str) -> Path:
        return self.root / "cleaned_data" / name

    def models(self, name: str) -> Path:
        return self.root / "models" / name

    def feedback(self, name: str) -> Path:
        return self.root / "feedback" / name

    @property
    def apps(self) -> Path:
        return self.root / "apps"


def find_settings(settings: str | Path | None = None) -> Path:
    """settings.ini: the argument, else $TOOLKIT_SETTINGS, else ../settings.ini (apps/ is in the
    project root, and Voila runs a notebook in its folder), else ./settings.ini."""
    if settings:
        return Path(settings)
    if os.environ.get(SETTINGS_ENV):
        return Path(os.environ[SETTINGS_ENV])
    parent = Path.cwd().parent / SETTINGS_FILE
    return parent if parent.is_file() else Path(SETTINGS_FILE)
