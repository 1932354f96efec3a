"""The settings machinery: the key table, `ClassifierSpec`, one parsed `Split`, reading and editing
settings.ini. One-line errors name the section and key.

`GENERIC_KEYS` are the keys every classifier has; a task kind adds its own (`toolkit/tasks/`), and
`toolkit.settings.load_settings` reads a file with all of them. Every default is written once, in
the key table: `ClassifierSpec`'s fields take theirs from it, and keys a task owns live in
`ClassifierSpec.options` (readable as attributes: `spec.pair_rule`). Paths are relative to the
settings file's folder, which is the project root (`toolkit.core.project`).
"""

from __future__ import annotations

import configparser
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from toolkit.core.artifacts import write_text_atomic
from toolkit.core.errors import SettingsError, ToolkitError
from toolkit.core.names import check_unique
from toolkit.core.project import ProjectPaths

SPLIT_HELP = "use 'auto', 'folder', 'random', 'random:0.2' or 'group:REGEX'"


@dataclass(frozen=True)
class Key:
    """One settings key: its parser, its default as written in settings.ini, its help, and whether it
    changes how a model trains (`trains`: sweeps may vary it) or the validation split (`splits`)."""

    parse: Callable[[str], Any]
    default: str
    help: str
    trains: bool = False
    splits: bool = False

    def default_value(self) -> Any:
        return self.parse(self.default)


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError("use yes or no")


def parse_positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive whole number")
    return number


def parse_embedding_size(value: str) -> int:
    number = int(value)
    if not 32 <= number <= 1024:
        raise ValueError("must be a whole number of pixels from 32 to 1024")
    return number


def parse_non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def parse_minutes(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 7 * 24 * 60:
        raise ValueError("must be minutes from 0 (no limit) to 10080, such as 15")
    return number


def parse_lr(value: str) -> float | None:
    if value.strip().lower() in ("", "auto"):
        return None
    number = float(value)
    if not 0 < number < 10:
        raise ValueError("must be 'auto' or a learning rate such as 1e-3")
    return number


def parse_lr_mult(value: str) -> float:
    number = float(value)
    if number < 1:
        raise ValueError("must be 1 or more (1: the same learning rate everywhere)")
    return number


def parse_wd(value: str) -> float:
    number = float(value)
    if not 0 <= number < 1:
        raise ValueError("must be a weight decay from 0 to below 1, such as 0.01")
    return number


def parse_dropout(value: str) -> float:
    number = float(value)
    if not 0 <= number < 1:
        raise ValueError("must be a dropout probability from 0 to below 1, such as 0.5")
    return number


def parse_list(value: str) -> list[str]:
    return [item.strip() for item in re.split(r"[,\n]", value) if item.strip()]


def parse_queries(value: str) -> list[str]:
    """Query templates, one per line or separated by '|'; each must contain {class}."""
    templates = [item.strip() for item in re.split(r"[|\n]", value) if item.strip()]
    for template in templates:
        if "{class}" not in template:
            raise ValueError(f"template {template!r} must contain {{class}}")
    return templates


def parse_split(value: str) -> str:
    return Split.parse(value).text


def compile_regex(value: str) -> re.Pattern:
    """The stripped value as a compiled regex, or a ValueError a settings error can quote."""
    try:
        return re.compile(value.strip())
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None


def parse_regex(value: str) -> str:
    pattern = value.strip()
    compiled = compile_regex(pattern)
    if compiled.groups < 1:
        raise ValueError("the regex needs a (group) that names the group")
    return pattern



def parse_valid_pct(value: str) -> float:
    number = float(value)
    if not 0 < number < 1:
        raise ValueError("must be a fraction between 0 and 1, such as 0.2")
    return number


def parse_classes(value: str) -> list[str]:
    """Comma- or line-separated class names, each one plain folder name, no two alike."""
    return check_unique(parse_list(value), "classes")


def parse_optional_regex(value: str) -> str:
    return parse_regex(value) if value.strip() else ""


def parse_fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise ValueError("must be between 0 and 1")
    return number


def parse_arch(value: str) -> str:
    from toolkit.core.backbones import BACKBONES

    name = value.strip()
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return name


def parse_text(value: str) -> str:
    return value.strip()


def choice(*choices: str) -> Callable[[str], str]:
    """A parser accepting one of `choices` (case as written in ddgs), or empty for 'any'."""

    def parse(value: str) -> str:
        text = value.strip()
        for choice in choices:
            if text.lower() == choice.lower():
                return choice
        raise ValueError(f"use one of: {', '.join(repr(c) for c in choices)}")

    return parse


def parse_source(value: str) -> str:
    text = value.strip()
    if text in ("", "auto", "ddgs", "fashion-mnist") or text.startswith(("fashion-mnist:", "folder:", "urls:")):
        return text or "auto"
    raise ValueError("use auto, ddgs, fashion-mnist[:DIR], folder:PATH or urls:FILE")


def parse_region(value: str) -> str:
    text = value.strip().lower()
    if not re.fullmatch(r"[a-z]{2}-[a-z]{2}", text):
        raise ValueError("use a ddgs region such as wt-wt (no region), us-en or de-de")
    return text


@dataclass(frozen=True)
class Split:
    """A parsed `split` rule: auto (the data's train/ + valid/ folders, else random), folder,
    random (`fraction`, else valid_pct) or group (whole groups named by `pattern`'s first group)."""

    kind: str
    fraction: float | None = None
    pattern: str = ""

    @classmethod
    def parse(cls, value: str) -> Split:
        rule = value.strip()
        if rule in ("auto", "folder", "random"):
            return cls(rule)
        kind, _, rest = rule.partition(":")
        if kind == "random" and rest:
            fraction = float(rest)
            if not 0 < fraction < 1:
                raise ValueError("the random fraction must be between 0 and 1")
            return cls("random", fraction)
        if kind == "group" and rest:
            return cls("group", None, parse_regex(rest))
        raise ValueError(SPLIT_HELP)

    @property
    def text(self) -> str:
        if self.kind == "group":
            return f"group:{self.pattern}"
        return f"random:{self.fraction:g}" if self.fraction is not None else self.kind

    @property
    def uses_folders(self) -> bool:
        """Whether the data's own train/ + valid/ folders are the split (when they exist)."""
        return self.kind in ("auto", "folder")

    def assign(self, files: Sequence[Path], valid_pct: float, seed: int) -> list[bool]:
        """Which files are held out: a seeded random fraction, or whole groups (group:REGEX)."""
        if self.kind == "group":
            return split_groups(files, self.pattern, valid_pct, seed)
        return split_random(len(files), self.fraction if self.fraction is not None else valid_pct, seed)


def split_random(n: int, fraction: float, seed: int) -> list[bool]:
    """A seeded random `fraction` of n items held out (at least one when n > 1)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(n * fraction))]) if n > 1 else set()
    return [i in held for i in range(n)]


def group_of(pattern: str, name: str) -> str | None:
    match = re.search(pattern, name)
    return match.group(1) if match else None


def split_groups(files: Sequence[Path], pattern: str, fraction: float, seed: int) -> list[bool]:
    """Whole groups (the regex's first group on each file name) held out, a seeded fraction of them."""
    groups = []
    for path in files:
        group = group_of(pattern, Path(path).name)
        if group is None:
            raise ToolkitError(f"split group:{pattern} does not match file {path}; fix the regex in settings.ini")
        groups.append(group)
    names = sorted(set(groups))
    held = {names[i] for i, v in enumerate(split_random(len(names), fraction, seed)) if v}
    return [g in held for g in groups]


# key -> Key: every classifier's keys; task kinds add theirs (toolkit/tasks/, `Task.keys`)
GENERIC_KEYS: dict[str, Key] = {
    "task": Key(parse_text, "single", "what the classifier does (see `toolkit tasks`): single, hierarchical, pairs"),
    "title": Key(parse_text, "", "the dashboard's title (default: the section name)"),
    "description": Key(parse_text, "", "one paragraph shown on the dashboard"),
    "classes": Key(parse_classes, "", "comma-separated class names (default: the data's folders)"),
    "queries": Key(parse_queries, "{class}", "web-search templates with {class}, one per line or '|'"),
    "per_class": Key(parse_positive_int, "150", "images to scrape per class (web search; folder and URL "
                     "imports take everything unless set)"),
    "max_size": Key(parse_positive_int, "400", "long side in pixels of scraped images"),
    "source": Key(parse_source, "auto", "where scrape gets images: ddgs, fashion-mnist[:DIR], folder:PATH, "
                  "urls:FILE (auto: fashion-mnist for a section named fashion-mnist, else ddgs)"),
    "region": Key(parse_region, "wt-wt", "ddgs search region, e.g. wt-wt, us-en"),
    "safesearch": Key(choice("on", "moderate", "off"), "moderate", "ddgs safesearch: on, moderate or off"),
    "image_size": Key(choice("", "Small", "Medium", "Large", "Wallpaper"), "", "ddgs size filter (empty: any)"),
    "type_image": Key(choice("", "photo", "clipart", "gif", "transparent", "line"), "",
                      "ddgs image type filter (empty: any)"),
    "layout": Key(choice("", "Square", "Tall", "Wide"), "", "ddgs layout filter (empty: any)"),
    "license_image": Key(choice("", "any", "Public", "Share", "ShareCommercially", "Modify", "ModifyCommercially"),
                         "", "ddgs license filter (empty: no filter)"),
    "allow_private_urls": Key(parse_bool, "no", "scrape may fetch loopback and private-network addresses "
                              "(tests, intranets); off by default"),
    "data": Key(parse_text, "", "a data folder to train on instead of scrape/NAME"),
    "arch": Key(parse_arch, "efficientnet_lite0", "the backbone (see `toolkit backbones`)", trains=True),
    "pretrained": Key(parse_bool, "yes", "start from ImageNet weights", trains=True),
    "size": Key(parse_positive_int, "288", "image size in pixels (square) for training", trains=True),
    "epochs": Key(parse_non_negative_int, "2", "unfrozen epochs of fine_tune (0 with top_epochs = 0: quick mode, "
                  "the head alone on cached body features, the fastest honest model)", trains=True),
    "freeze_epochs": Key(parse_non_negative_int, "8",
                         "frozen-phase epochs: the head alone, on cached body features (cheap)", trains=True),
    "top_epochs": Key(parse_non_negative_int, "5", "top-phase epochs, after the frozen phase: the body's last "
                      "stages (the registry's top_start) and the head train on cached maps of the stages before "
                      "(about a fifth of an unfrozen epoch each); 0 with epochs = 0: quick mode", trains=True),
    "time_budget": Key(parse_minutes, "15", "minutes `toolkit train` may take: after the frozen phase it times a "
                       "training step and runs only the unfrozen epochs that fit (0: no limit, all `epochs`)",
                       trains=True),
    "bs": Key(parse_positive_int, "32", "batch size", trains=True),
    "lr": Key(parse_lr, "auto", "learning rate, or auto for the lr_find valley", trains=True),
    "lr_find_iters": Key(parse_positive_int, "40", "mini-batches lr_find tries", trains=True),
    "lr_mult": Key(parse_lr_mult, "100", "unfrozen: the head's lr over the earliest layers' (fastai's lr_mult)",
                   trains=True),
    "body_bn": Key(choice("frozen", "adapt"), "frozen",
                   "unfrozen: the body's batch norms keep ImageNet's statistics (frozen), or switch to the data's "
                   "batch statistics as fastai's BnFreeze lets them (adapt: data far from ImageNet)", trains=True),
    "head_features": Key(choice("multi_stage", "final"), "multi_stage",  # backbones.head_taps reads it
                         "what the head reads: the body's final features and its inner stages pooled (multi_stage: "
                         "the taps of the backbone registry: about +1 point in cross-validation on clothing-small "
                         "at no extra body time), or the final features alone (final)", trains=True),
    "wd": Key(parse_wd, "0.01", "weight decay (fastai's wd, decoupled as AdamW's)", trains=True),
    "dropout": Key(parse_dropout, "0.5", "the head's dropout (fastai's ps: this before the last layer, half of it "
                   "before the first)", trains=True),
    "split": Key(parse_split, "auto", "validation split: " + SPLIT_HELP),
    "valid_pct": Key(parse_valid_pct, "0.2", "validation fraction for split = random or group"),
    "group": Key(parse_optional_regex, "",
                 "regex on the file name whose first group names the group (per-group results)"),
    "seed": Key(int, "42", "random seed for splits, sampling and training", trains=True, splits=True),
    "preheat": Key(parse_bool, "no", "`toolkit serve` keeps a pre-heated Voila kernel for this dashboard"),
    "clean_size": Key(parse_embedding_size, "160", "image size in pixels of the cleaning embeddings (`toolkit clean` "
                      "and its app share them; 128 is about a quarter quicker cold and ranks flipped labels a little "
                      "worse, 192 a little better at nearly twice the cold time)"),
}
# keys a sweep may vary; ensemble members may vary them too, except those that change the split
TRAINING_KEYS = tuple(k for k, key in GENERIC_KEYS.items() if key.trains)
MEMBER_KEYS = tuple(k for k in TRAINING_KEYS if not GENERIC_KEYS[k].splits)


def _default(key: str) -> Any:
    """A dataclass field whose default is the key table's (the one place defaults are written)."""
    return field(default_factory=lambda: GENERIC_KEYS[key].default_value())


@dataclass(frozen=True)
class ClassifierSpec:
    """One classifier of settings.ini, with every value parsed and every path absolute. Keys a task
    kind owns are in `options` and read as attributes (`spec.pair_rule`)."""

    name: str
    root: Path
    task: str = _default("task")
    title: str = _default("title")
    description: str = _default("description")
    classes: list[str] = _default("classes")
    queries: list[str] = _default("queries")
    per_class: int = _default("per_class")
    max_size: int = _default("max_size")
    source: str = _default("source")
    region: str = _default("region")
    safesearch: str = _default("safesearch")
    image_size: str = _default("image_size")
    type_image: str = _default("type_image")
    layout: str = _default("layout")
    license_image: str = _default("license_image")
    allow_private_urls: bool = _default("allow_private_urls")
    data: str = _default("data")
    arch: str = _default("arch")
    pretrained: bool = _default("pretrained")
    size: int = _default("size")
    epochs: int = _default("epochs")
    freeze_epochs: int = _default("freeze_epochs")
    top_epochs: int = _default("top_epochs")
    time_budget: float = _default("time_budget")
    bs: int = _default("bs")
    lr: float | None = _default("lr")
    lr_find_iters: int = _default("lr_find_iters")
    lr_mult: float = _default("lr_mult")
    body_bn: str = _default("body_bn")
    head_features: str = _default("head_features")
    wd: float = _default("wd")
    dropout: float = _default("dropout")
    split: str = _default("split")
    valid_pct: float = _default("valid_pct")
    group: str = _default("group")
    seed: int = _default("seed")
    preheat: bool = _default("preheat")
    clean_size: int = _default("clean_size")
    options: Mapping[str, Any] = field(default_factory=dict)
    explicit: frozenset[str] = frozenset()  # the keys settings.ini sets for this section (not defaults)

    def __getattr__(self, key: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and key in options:
            return options[key]
        raise AttributeError(f"{type(self).__name__} has no key {key!r}")

    @property
    def paths(self) -> ProjectPaths:
        return ProjectPaths(self.root)

    @property
    def scrape_dir(self) -> Path:
        return self.paths.scrape(self.name)

    @property
    def cleaned_dir(self) -> Path:
        return self.paths.cleaned(self.name)

    @property
    def models_dir(self) -> Path:
        return self.paths.models(self.name)

    @property
    def feedback_dir(self) -> Path:
        return self.paths.feedback(self.name)

    @property
    def data_dir(self) -> Path | None:
        """The `data` key as an absolute path, or None."""
        return (self.root / self.data).resolve() if self.data else None

    @property
    def split_rule(self) -> Split:
        return Split.parse(self.split)

    @property
    def display_title(self) -> str:
        return self.title or self.name

    def with_overrides(self, **overrides: Any) -> ClassifierSpec:
        """A copy with overrides applied (None: keep the setting); option keys go into `options`."""
        given = {key: value for key, value in overrides.items() if value is not None}
        if "arch" in given:
            check_value(self.name, "arch", str(given["arch"]), GENERIC_KEYS)
        options = {k: given.pop(k) for k in list(given) if k not in SPEC_FIELDS}
        return replace(self, **given, options={**self.options, **options}) if options else replace(self, **given)


SPEC_FIELDS = {f.name for f in fields(ClassifierSpec)}
assert set(GENERIC_KEYS) <= SPEC_FIELDS, "every generic key is a ClassifierSpec field"


def check_value(section: str, key: str, raw: str, keys: Mapping[str, Key]) -> Any:
    """The parsed value, or a SettingsError naming `[section] key = value` and what is wrong."""
    try:
        return keys[key].parse(raw)
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


SECTION_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
NO_DEFAULT_SECTION = "\0none"  # [DEFAULT] is read as a section of its own, so own keys can be told apart


def read_config(path: Path) -> configparser.ConfigParser:
    """The raw ConfigParser (interpolation off, key case kept, [DEFAULT] an ordinary section), or a
    one-line SettingsError (missing, not UTF-8, not valid INI)."""
    if not path.is_file():
        raise SettingsError(f"settings file {path} not found (pass --settings PATH)")
    parser = configparser.ConfigParser(interpolation=None, default_section=NO_DEFAULT_SECTION)
    parser.optionxform = str  # keep keys as written so typos are reported as written
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise SettingsError(f"{path}: line {line} is not UTF-8 text (byte {path.read_bytes()[exc.start]:#04x}); "
                            "save the file as UTF-8") from None
    except OSError as exc:
        raise SettingsError(f"settings file {path}: {exc.strerror}") from None
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        first_line = str(exc).splitlines()[0]
        raise SettingsError(f"{path}: not a valid settings file: {first_line}") from None
    return parser


def read_sections(path: Path) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """settings.ini -> ([DEFAULT]'s keys, {section: its own keys}) as written, sections checked."""
    parser = read_config(path)
    defaults = dict(parser.items("DEFAULT")) if parser.has_section("DEFAULT") else {}
    sections = {}
    for section in parser.sections():
        if section == "DEFAULT":
            continue
        if not re.fullmatch(SECTION_NAME, section):
            raise SettingsError(
                f"settings [{section}]: a classifier name may hold only letters, digits, '.', '_' and '-'")
        sections[section] = dict(parser.items(section))
    return defaults, sections


def set_keys(path: str | Path, section: str, values: dict[str, str], keys: Mapping[str, Key] = GENERIC_KEYS) -> None:
    """Set `key = value` lines of [section] in settings.ini, editing the text so comments, order
    and other sections stay as written. Each value is checked by its key's parser first (one line,
    no control characters); a key already there is replaced in place (with its continuation lines),
    a new one is added at the end of the section. Written atomically (temp file + rename)."""
    path = Path(path)
    for key, raw in values.items():
        if key not in keys:
            raise SettingsError(f"settings [{section}] has unknown key {key!r}; known: {', '.join(keys)}")
        if any(c in str(raw) for c in "\r\n\0"):
            raise SettingsError(f"settings [{section}] {key}: a value must be one line (no line breaks)")
        check_value(section, key, str(raw), keys)
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
    write_text_atomic(path, "".join(lines))
