"""settings.ini -> typed classifier specs, with one-line errors naming the section and key.

`[DEFAULT]` holds values every classifier shares; each other section is one classifier. A
minimal section is just `[NAME]`: its classes then come from its data folders. Paths are
relative to the settings file's folder, which is the project root (`scrape/`, `cleaned_data/`,
`models/`, `apps/` live beside it).
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from toolkit.core.errors import SettingsError

TASKS = ("single", "pairs", "hierarchical")
APPROACHES = ("stacked", "siamese", "both")
# shoe-pairs names: u001_2_left_w.jpg = person u001, pair 2, left shoe, women's
DEFAULT_PAIR_RULE = r"^(?P<person>[^_]+)_(?P<pair>[^_]+)_(?P<side>left|right)_(?P<group>[^_.]+)\."
PAIR_RULE_GROUPS = ("person", "pair", "side", "group")
SPLIT_HELP = "use 'auto', 'folder', 'random', 'random:0.2' or 'group:REGEX'"


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError("use yes or no")


def _parse_positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive whole number")
    return number


def _parse_non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _parse_lr(value: str) -> float | None:
    if value.strip().lower() in ("", "auto"):
        return None
    number = float(value)
    if not 0 < number < 10:
        raise ValueError("must be 'auto' or a learning rate such as 1e-3")
    return number


def _parse_lr_mult(value: str) -> float:
    number = float(value)
    if number < 1:
        raise ValueError("must be 1 or more (1: the same learning rate everywhere)")
    return number


def _parse_list(value: str) -> list[str]:
    return [item.strip() for item in re.split(r"[,\n]", value) if item.strip()]


def _parse_queries(value: str) -> list[str]:
    """Query templates, one per line or separated by '|'; each must contain {class}."""
    templates = [item.strip() for item in re.split(r"[|\n]", value) if item.strip()]
    for template in templates:
        if "{class}" not in template:
            raise ValueError(f"template {template!r} must contain {{class}}")
    return templates


def _parse_task(value: str) -> str:
    task = value.strip()
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return task


def _parse_hierarchy(value: str) -> dict[str, str]:
    """`PATH` or `FOLDER: PATH` items (comma or line separated) -> {folder: path}; see toolkit/hierarchy.py."""
    from toolkit.hierarchy import parse_hierarchy

    return parse_hierarchy(value)


def _parse_split(value: str) -> str:
    rule = value.strip()
    if rule in ("auto", "folder", "random"):
        return rule
    if rule.startswith("random:"):
        fraction = float(rule.split(":", 1)[1])
        if not 0 < fraction < 1:
            raise ValueError("the random fraction must be between 0 and 1")
        return rule
    if rule.startswith("group:"):
        _parse_regex(rule.split(":", 1)[1])
        return rule
    raise ValueError(SPLIT_HELP)


def _compile(value: str) -> re.Pattern:
    """The stripped value as a compiled regex, or a ValueError a settings error can quote."""
    try:
        return re.compile(value.strip())
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None


def _parse_regex(value: str) -> str:
    pattern = value.strip()
    compiled = _compile(pattern)
    if compiled.groups < 1:
        raise ValueError("the regex needs a (group) that names the group")
    return pattern


def _parse_pair_rule(value: str) -> str:
    pattern = value.strip()
    compiled = _compile(pattern)
    missing = [name for name in PAIR_RULE_GROUPS if name not in compiled.groupindex]
    if missing:
        raise ValueError(f"the regex needs the named groups {', '.join(f'(?P<{m}>...)' for m in missing)}")
    return pattern


def _parse_fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise ValueError("must be between 0 and 1")
    return number


def _parse_arch(value: str) -> str:
    from toolkit.core.backbones import BACKBONES

    name = value.strip()
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return name


def _parse_text(value: str) -> str:
    return value.strip()


def _choice(*choices: str) -> Callable[[str], str]:
    """A parser accepting one of `choices` (case as written in ddgs), or empty for 'any'."""

    def parse(value: str) -> str:
        text = value.strip()
        for choice in choices:
            if text.lower() == choice.lower():
                return choice
        raise ValueError(f"use one of: {', '.join(repr(c) for c in choices)}")

    return parse


def _parse_source(value: str) -> str:
    text = value.strip()
    if text in ("", "auto", "ddgs", "fashion-mnist") or text.startswith(("fashion-mnist:", "folder:", "urls:")):
        return text or "auto"
    raise ValueError("use auto, ddgs, fashion-mnist[:DIR], folder:PATH or urls:FILE")


def _parse_region(value: str) -> str:
    text = value.strip().lower()
    if not re.fullmatch(r"[a-z]{2}-[a-z]{2}", text):
        raise ValueError("use a ddgs region such as wt-wt (no region), us-en or de-de")
    return text


# ensemble members may change how a model is built and trained, never the data or its split
MEMBER_KEYS = ("arch", "pretrained", "size", "epochs", "freeze_epochs", "bs", "lr", "lr_find_iters", "lr_mult",
               "body_bn")
ENSEMBLE_MODES = ("mean", "class_weighted")


def _parse_ensemble(value: str) -> list[dict[str, Any]]:
    """'size=75 | size=100 arch=resnet34' -> [{'size': 75}, {'size': 100, 'arch': 'resnet34'}]:
    members ('|' or one per line), each a set of KEY=VALUE overrides of the section's settings."""
    members: list[dict[str, Any]] = []
    for text in (item.strip() for item in re.split(r"[|\n]", value)):
        if not text:
            continue
        overrides: dict[str, Any] = {}
        for pair in text.split():
            key, sep, raw = pair.partition("=")
            if not sep or not raw:
                raise ValueError(f"member {text!r}: write KEY=VALUE pairs such as size=100 arch=resnet34")
            if key not in MEMBER_KEYS:
                raise ValueError(f"member {text!r}: {key!r} cannot differ between members; "
                                 f"use {', '.join(MEMBER_KEYS)}")
            try:
                overrides[key] = KEYS[key][0](raw)
            except ValueError as exc:
                raise ValueError(f"member {text!r}: {key} = {raw!r}: {exc}") from None
        if overrides in members:
            raise ValueError(f"member {text!r} is listed twice")
        members.append(overrides)
    if len(members) == 1:
        raise ValueError("an ensemble needs at least 2 members, e.g. size=75 | size=100")
    return members


# key -> (parser, default as it would be written in settings.ini, help)
KEYS: dict[str, tuple[Callable[[str], Any], str, str]] = {
    "task": (_parse_task, "single", "what the classifier does: " + ", ".join(TASKS)),
    "title": (_parse_text, "", "the dashboard's title (default: the section name)"),
    "description": (_parse_text, "", "one paragraph shown on the dashboard"),
    "classes": (_parse_list, "", "comma-separated class names (default: the data's folders)"),
    "queries": (_parse_queries, "{class}", "web-search templates with {class}, one per line or '|'"),
    "per_class": (_parse_positive_int, "150", "images to scrape per class"),
    "max_size": (_parse_positive_int, "400", "long side in pixels of scraped images"),
    "source": (_parse_source, "auto", "where scrape gets images: ddgs, fashion-mnist[:DIR], folder:PATH, urls:FILE "
               "(auto: fashion-mnist for a section named fashion-mnist, else ddgs)"),
    "allow_private_urls": (_parse_bool, "no", "scrape may fetch URLs on loopback, private, link-local and other "
                           "non-public addresses (tests, intranets); no: such URLs are refused"),
    "region": (_parse_region, "wt-wt", "ddgs search region, e.g. wt-wt, us-en"),
    "safesearch": (_choice("on", "moderate", "off"), "moderate", "ddgs safesearch: on, moderate or off"),
    "image_size": (_choice("", "Small", "Medium", "Large", "Wallpaper"), "", "ddgs size filter (empty: any)"),
    "type_image": (_choice("", "photo", "clipart", "gif", "transparent", "line"), "",
                   "ddgs image type filter (empty: any)"),
    "layout": (_choice("", "Square", "Tall", "Wide"), "", "ddgs layout filter (empty: any)"),
    "license_image": (_choice("", "any", "Public", "Share", "ShareCommercially", "Modify", "ModifyCommercially"), "",
                      "ddgs license filter (empty: no filter)"),
    "data": (_parse_text, "", "a data folder to train on instead of scrape/NAME"),
    "arch": (_parse_arch, "efficientnet_lite0", "the backbone (see `toolkit backbones`)"),
    "pretrained": (_parse_bool, "yes", "start from ImageNet weights"),
    "size": (_parse_positive_int, "288", "image size in pixels (square) for training"),
    "epochs": (_parse_positive_int, "2", "unfrozen epochs of fine_tune"),
    "freeze_epochs": (_parse_non_negative_int, "8",
                      "frozen-phase epochs: the head alone, on cached body features (cheap)"),
    "bs": (_parse_positive_int, "32", "batch size"),
    "lr": (_parse_lr, "auto", "learning rate, or auto for the lr_find valley"),
    "lr_find_iters": (_parse_positive_int, "40", "mini-batches lr_find tries"),
    "lr_mult": (_parse_lr_mult, "100", "unfrozen: the head's lr over the earliest layers' (fastai's lr_mult)"),
    "body_bn": (_choice("frozen", "adapt"), "frozen",
                "unfrozen: the body's batch norms keep ImageNet's statistics (frozen), or switch to the data's "
                "batch statistics as fastai's BnFreeze lets them (adapt: data far from ImageNet)"),
    "hierarchy": (_parse_hierarchy, "", "task = hierarchical: data folders as label paths, 'tops/shirt' or "
                  "'FOLDER: tops/shirt' items (default: nested folders shoes/female/sandals/ are the paths)"),
    "split": (_parse_split, "auto", "validation split: " + SPLIT_HELP),
    "valid_pct": (float, "0.2", "validation fraction for split = random or group"),
    "group": (_parse_regex, "", "regex on the file name whose first group names the group"),
    "seed": (int, "42", "random seed for splits, sampling and training"),
    "pair_rule": (_parse_pair_rule, DEFAULT_PAIR_RULE,
                  "task = pairs: regex on photo names with named groups person, pair, side (left|right), group"),
    "approach": (_choice(*APPROACHES), "both", "task = pairs: stacked (one image), siamese (two inputs) or both "
                 "(each in models/NAME/<approach>/, the better one served)"),
    "negatives": (_parse_positive_int, "1", "task = pairs: negative pairs per positive pair"),
    "hard_share": (_parse_fraction, "0.5", "task = pairs: share of negatives that are hard (the same person's "
                   "other pairs); the rest are easy (other people)"),
    "preheat": (_parse_bool, "no", "`toolkit serve` keeps a pre-heated Voila kernel for this dashboard"),
    "ensemble": (_parse_ensemble, "", "members of an ensemble, '|'-separated, each KEY=VALUE overrides of "
                 "this section's " + ", ".join(MEMBER_KEYS) + " (e.g. size=75 | size=100); empty: one model"),
    "ensemble_mode": (_choice(*ENSEMBLE_MODES), "class_weighted",
                      "how an ensemble combines probabilities: mean, or class_weighted (per class by "
                      "each member's validation recall)"),
}


@dataclass(frozen=True)
class ClassifierSpec:
    """One classifier of settings.ini, with every value parsed and every path absolute."""

    name: str
    root: Path
    task: str = "single"
    title: str = ""
    description: str = ""
    classes: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=lambda: ["{class}"])
    per_class: int = 150
    max_size: int = 400
    source: str = "auto"
    allow_private_urls: bool = False
    region: str = "wt-wt"
    safesearch: str = "moderate"
    image_size: str = ""
    type_image: str = ""
    layout: str = ""
    license_image: str = ""
    data: str = ""
    arch: str = "efficientnet_lite0"
    pretrained: bool = True
    size: int = 288
    epochs: int = 2
    freeze_epochs: int = 8
    bs: int = 32
    lr: float | None = None
    lr_find_iters: int = 40
    lr_mult: float = 100.0
    body_bn: str = "frozen"
    hierarchy: dict[str, str] = field(default_factory=dict)
    split: str = "auto"
    valid_pct: float = 0.2
    group: str = ""
    seed: int = 42
    preheat: bool = False
    pair_rule: str = DEFAULT_PAIR_RULE
    approach: str = "both"
    negatives: int = 1
    hard_share: float = 0.5
    ensemble: list[dict[str, Any]] = field(default_factory=list)
    ensemble_mode: str = "class_weighted"

    @property
    def scrape_dir(self) -> Path:
        return self.root / "scrape" / self.name

    @property
    def cleaned_dir(self) -> Path:
        return self.root / "cleaned_data" / self.name

    @property
    def models_dir(self) -> Path:
        return self.root / "models" / self.name

    @property
    def data_dir(self) -> Path | None:
        """The `data` key as an absolute path, or None."""
        return (self.root / self.data).resolve() if self.data else None

    @property
    def display_title(self) -> str:
        return self.title or self.name

    def with_overrides(self, **overrides: Any) -> ClassifierSpec:
        """A copy with command-line overrides applied (None means: keep the setting)."""
        given = {key: value for key, value in overrides.items() if value is not None}
        if "arch" in given:
            _check(self.name, "arch", str(given["arch"]))
        return replace(self, **given)


_FIELD_NAMES = {f.name for f in fields(ClassifierSpec)}
assert set(KEYS) <= _FIELD_NAMES, "every settings key is a ClassifierSpec field"


def _check(section: str, key: str, raw: str) -> Any:
    parser = KEYS[key][0]
    try:
        return parser(raw)
    except ValueError as exc:
        raise SettingsError(f"settings [{section}] {key} = {raw.strip()!r}: {exc}") from None


@dataclass(frozen=True)
class Settings:
    """A parsed settings.ini: its path and its classifiers by name, in file order."""

    path: Path
    classifiers: dict[str, ClassifierSpec]

    @property
    def root(self) -> Path:
        return self.path.parent

    def get(self, name: str) -> ClassifierSpec:
        if name not in self.classifiers:
            known = ", ".join(self.classifiers) or "none"
            raise SettingsError(
                f"{self.path.name} has no classifier [{name}]; known: {known} "
                f"(add a [{name}] section to {self.path})"
            )
        return self.classifiers[name]


def _check_hierarchy(spec: ClassifierSpec) -> None:
    """`hierarchy` belongs to task = hierarchical and must map every listed class."""
    if spec.hierarchy and spec.task != "hierarchical":
        raise SettingsError(f"settings [{spec.name}] hierarchy is set but task = {spec.task}; "
                            "add task = hierarchical or remove hierarchy")
    missing = [c for c in spec.classes if c not in spec.hierarchy] if spec.hierarchy else []
    if missing:
        raise SettingsError(f"settings [{spec.name}] hierarchy has no path for class(es) {', '.join(missing)}; "
                            f"add e.g. '{missing[0]}: parent/{missing[0]}'")


def read_config(path: Path) -> configparser.ConfigParser:
    """The raw ConfigParser (interpolation off, key case kept), or a one-line SettingsError."""
    if not path.is_file():
        raise SettingsError(f"settings file {path} not found (pass --settings PATH)")
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keep keys as written so typos are reported as written
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as exc:
        first_line = str(exc).splitlines()[0]
        raise SettingsError(f"{path}: not a valid settings file: {first_line}") from None
    return parser


def load_settings(path: str | Path = "settings.ini") -> Settings:
    """Read and validate settings.ini; every error names the section and key."""
    path = Path(path).resolve()
    parser = read_config(path)
    for key in parser.defaults():
        if key not in KEYS:
            raise SettingsError(f"settings [DEFAULT] has unknown key {key!r}; known: {', '.join(KEYS)}")
    classifiers = {}
    for section in parser.sections():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", section):
            raise SettingsError(
                f"settings [{section}]: a classifier name may hold only letters, digits, '.', '_' and '-'"
            )
        values: dict[str, Any] = {}
        for key, raw in parser.items(section):
            if key not in KEYS:
                raise SettingsError(f"settings [{section}] has unknown key {key!r}; known: {', '.join(KEYS)}")
            values[key] = _check(section, key, raw)
        classifiers[section] = spec = ClassifierSpec(name=section, root=path.parent, **values)
        _check_hierarchy(spec)
    return Settings(path=path, classifiers=classifiers)


def set_keys(path: str | Path, section: str, values: dict[str, str]) -> None:
    """Set `key = value` lines of [section] in settings.ini, editing the text so comments, order
    and other sections stay as written. Each value is checked by its `KEYS` parser first; a key
    already there is replaced in place (with its continuation lines), a new one is added at the
    end of the section."""
    path = Path(path)
    for key, raw in values.items():
        if key not in KEYS:
            raise SettingsError(f"settings [{section}] has unknown key {key!r}; known: {', '.join(KEYS)}")
        _check(section, key, str(raw))
    if not path.is_file():
        raise SettingsError(f"settings file {path} not found (pass --settings PATH)")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    header = re.compile(r"^\s*\[([^\]]+)\]\s*$")
    start = next((i for i, line in enumerate(lines) if (m := header.match(line)) and m.group(1).strip() == section),
                 None)
    if start is None:
        raise SettingsError(f"{path}: no [{section}] section to set {', '.join(values)} in")
    for key, raw in values.items():
        end = next((i for i in range(start + 1, len(lines)) if header.match(lines[i])), len(lines))
        new = f"{key} = {str(raw).strip()}\n"
        found = next((i for i in range(start + 1, end) if re.match(rf"^{re.escape(key)}\s*[=:]", lines[i])), None)
        if found is None:
            at = end
            while at > start + 1 and not lines[at - 1].strip():
                at -= 1
            if not lines[at - 1].endswith("\n"):
                lines[at - 1] += "\n"
            lines.insert(at, new)
        else:
            last = found
            while last + 1 < end and lines[last + 1][:1] in (" ", "\t") and lines[last + 1].strip():
                last += 1
            lines[found:last + 1] = [new]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)
