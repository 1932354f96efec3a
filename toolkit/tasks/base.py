"""The `Task` interface: everything particular to one kind of classifier, with the single-label
classifier's behaviour as the defaults, so a kind overrides only what differs.

A task kind owns: its settings keys (`keys`) and checks (`check_spec`); how it lists and labels its
data (`list_images`, `to_labels`, `load_data`); training (`train`: the shared recipe by default);
its predictor (`predictor`) and how probabilities read (`describe`); its figures (`metrics`,
`plots`, `report`), evaluation (`evaluate`), model-card rows and dashboard parts; and which
cross-cutting features it supports (`supports`, from `FEATURES`). Generic code asks the registry
(`toolkit.tasks.task_of`) for the task and never compares task names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from toolkit.core import artifacts
from toolkit.core.backbones import create_model, get_backbone, head_taps
from toolkit.core.config import ClassifierSpec, Key
from toolkit.core.errors import SettingsError, ToolkitError
from toolkit.core.images import load_squished, to_batch, verify_images
from toolkit.core.metrics import format_report, metrics_from_probs, plot_confusion, plot_losses, plot_top_losses
from toolkit.core.names import check_name
from toolkit.data import Dataset, balanced, count_by_class, list_labelled_images, load_dataset, make_dataloaders
from toolkit.learn import data_fingerprint, fit_learner, make_learner
from toolkit.predict import ImagePredictor, Prediction, describe_argmax

# cross-cutting features a task kind may support; anything else is refused in one line
FEATURES = {
    "sweep": "toolkit sweep (a grid of trainings)",
    "explain": "toolkit explain and the dashboard's Grad-CAM",
    "ensemble": "the ensemble key (members at several sizes or backbones)",
    "clean": "toolkit clean (rankings and decisions over class folders)",
    "check": "toolkit check (overfit one batch)",
    "tta": "evaluate --tta (flip test-time augmentation)",
    "head_only": "toolkit train --head-only (the head retrained on cached body features)",
    "distributed": "toolkit train --processes N / accelerate launch (data-parallel training)",
}
Log = Callable[[str], None]


class Task:
    """One kind of classifier. Class attributes describe it; methods default to single-label."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    keys: ClassVar[dict[str, Key]] = {}
    supports: ClassVar[frozenset[str]] = frozenset()
    n_inputs: ClassVar[int] = 1  # images one prediction takes
    data_hint: ClassVar[str] = "a folder of <class>/ image folders"

    # ------------------------------------------------------------ settings

    def check_spec(self, spec: ClassifierSpec) -> None:
        """Checks across keys, raised as SettingsError naming the section and key."""

    def require(self, feature: str, spec_name: str, key: str = "task") -> None:
        """A one-line refusal unless this kind supports `feature`."""
        if feature not in self.supports:
            raise SettingsError(f"settings [{spec_name}] {key}: task = {self.name} does not support "
                                f"{FEATURES[feature]}; supported: {', '.join(sorted(self.supports)) or 'none'}")

    # ------------------------------------------------------------ data

    def list_images(self, folder: Path, spec: ClassifierSpec) -> tuple[list[Path], list[str]]:
        """Image files of a training data folder and their folder labels."""
        return list_labelled_images(folder)

    def to_labels(self, folder_labels: list[str], spec: ClassifierSpec, where: str) -> list[str]:
        """Folder labels (of the data folder `where`) -> the model's class names (identity for single-label)."""
        return folder_labels

    def eval_images(self, folder: Path, meta: dict[str, Any]) -> tuple[list[Path], list[str]]:
        """Image files of an evaluation folder and their labels, as the model's classes name them."""
        return list_labelled_images(folder)

    def folder_classes(self, meta: dict[str, Any]) -> dict[str, str]:
        """Class folder -> model class, where a kind names classes other than by their folder."""
        return {}

    def load_data(self, spec: ClassifierSpec, data: Path | None = None, *, progress: bool = True) -> Dataset:
        return load_dataset(spec, data, list_images=lambda folder: self.list_images(folder, spec),
                            to_labels=lambda labels, root: self.to_labels(labels, spec, str(root)),
                            progress=progress)

    # ------------------------------------------------------------ training (the shared recipe)

    def model_meta(self, spec: ClassifierSpec, dataset: Dataset) -> dict[str, Any]:
        """Extra model.json fields of this kind."""
        return {}

    def train(self, spec: ClassifierSpec, data: Path | None = None, *, out: Path | None = None,
              progress: bool = True, log: Log = print, callbacks: Sequence = ()) -> dict:
        """Train spec's classifier into `out` (default models/NAME/) and return its metrics (also in
        metrics.json): verified data -> DataLoaders -> Learner -> lr_find -> frozen phase on cached
        features -> unfrozen fine-tuning -> pickle-free export, fastai export, metrics, plots."""
        from fastai.torch_core import set_seed

        from toolkit import distributed

        started = time.time()
        world = distributed.world_size()
        if world > 1:  # launched by --processes N / accelerate launch: join the group; rank 0 speaks
            self.require("distributed", spec.name)
            distributed.init()
            if not distributed.is_main():
                progress, log = False, (lambda line: None)
        out = Path(out) if out is not None else spec.models_dir
        out.mkdir(parents=True, exist_ok=True)
        dataset = self.load_data(spec, data, progress=progress)
        log(f"data: {dataset.root} - {dataset.n_train} train, {dataset.n_valid} valid, "
            f"classes {count_by_class(dataset.labels)}")
        bad_report = out / "bad_images.json"
        if distributed.is_main():
            artifacts.write_json(bad_report, [{"file": str(b.path), "reason": b.reason} for b in dataset.bad])
        if dataset.bad:
            log(f"warning: left out {len(dataset.bad)} unreadable file(s), listed in {bad_report}; "
                f"first: {dataset.bad[0].reason}")
        for warning in dataset.warnings:
            log(f"warning: {warning}")
        backbone = get_backbone(spec.arch)
        set_seed(spec.seed)
        dls = make_dataloaders(dataset, spec.size, spec.bs, backbone.mean, backbone.std, seed=spec.seed,
                               progress=progress)
        taps = head_taps(spec.arch, spec.head_features)
        model = create_model(spec.arch, len(dataset.classes), pretrained=spec.pretrained, taps=taps)
        learn = make_learner(dls, model, out, pretrained=spec.pretrained, progress=progress,
                             keep_bn_stats=spec.body_bn == "frozen")
        fitted = fit_learner(learn, spec, out, log, progress=progress, callbacks=callbacks, started=started)
        if not distributed.is_main():  # rank 0 alone scores and writes models/NAME/
            return {"name": spec.name, "world_size": world, "rank": distributed.rank()}
        with distributed.single_process():  # fastai would gather predictions from ranks that have left
            probs = learn.get_preds(ds_idx=1)[0].numpy()
        valid_files, valid_labels = dataset.subset(valid=True)
        metrics = self.metrics(probs, valid_labels, dataset.classes, valid_files, spec.group)
        fingerprint = data_fingerprint(dataset)
        meta = {"name": spec.name, "title": spec.display_title, "description": spec.description,
                "arch": spec.arch, "taps": list(taps), "pretrained": spec.pretrained, "classes": dataset.classes,
                "size": spec.size, "mean": list(backbone.mean), "std": list(backbone.std), "group": spec.group,
                "data": {"dir": str(dataset.root), "fingerprint": fingerprint,
                         "n_train": dataset.n_train, "n_valid": dataset.n_valid},
                **self.model_meta(spec, dataset)}
        artifacts.write_model(out, learn.model, meta, self.name)
        learn.export(out / "export.pkl")
        self.plots(metrics, out, f"{spec.name} validation")
        plot_losses(fitted["history"], out / "losses.png")
        plot_top_losses([load_squished(f, spec.size) for f in valid_files], valid_labels, probs,
                        dataset.classes, out / "top_losses.png")
        epochs_run = fitted["epochs_run"] + fitted["top_epochs_run"] + spec.freeze_epochs
        metrics.update({
            "name": spec.name, "task": self.name, "arch": spec.arch, "size": spec.size, "epochs": spec.epochs,
            "epochs_run": fitted["epochs_run"], "time_budget": spec.time_budget, "freeze_epochs": spec.freeze_epochs,
            "top_epochs": spec.top_epochs, "top_epochs_run": fitted["top_epochs_run"],
            "bs": spec.bs, "lr": fitted["lr"], "lr_mult": spec.lr_mult,
            "lr_find": fitted["lr_find"], "n_train": dataset.n_train, "n_valid": dataset.n_valid,
            "bad_files": len(dataset.bad), "warnings": dataset.warnings, "data": str(dataset.root),
            "data_fingerprint": fingerprint, "fit_seconds": round(fitted["fit_seconds"], 1),
            "wall_seconds": round(time.time() - started, 1),
            "train_images_per_second": round(dataset.n_train * epochs_run / fitted["fit_seconds"], 2),
            "history": [list(map(float, v)) for v in fitted["values"]],
            "world_size": world, "bs_per_process": spec.bs, "global_bs": spec.bs * world,
        })
        artifacts.write_metrics(out, metrics)
        log(f"valid accuracy {metrics['accuracy']:.2%} on {metrics['n']} images; "
            f"{metrics['train_images_per_second']} train images/s; wrote {out}")
        for line in self.report_extra(metrics):
            log(f"  {line}")
        return metrics

    def result_keys(self) -> tuple[str, ...]:
        """The metrics `toolkit train --json` prints."""
        return ("accuracy", "n", "per_class", "groups")

    def plot_names(self) -> tuple[str, ...]:
        return ("lr_find.png", "losses.png", "confusion_matrix.png", "top_losses.png")

    # ------------------------------------------------------------ figures

    def metrics(self, probs: np.ndarray, labels: Sequence[str], classes: Sequence[str],
                files: Sequence[Path] | None = None, group: str = "") -> dict:
        return metrics_from_probs(probs, labels, classes, files, group)

    def plots(self, metrics: dict, folder: Path, title: str) -> list[Path]:
        return [plot_confusion(metrics, folder / "confusion_matrix.png", title=title)]

    def report(self, metrics: dict) -> str:
        return "\n".join([format_report(metrics), *self.report_extra(metrics)])

    def report_extra(self, metrics: dict) -> list[str]:
        """Lines of this kind's own figures, after the generic report."""
        return []

    # ------------------------------------------------------------ prediction

    def predictor(self, folder: Path, meta: dict[str, Any], *, device: str | None = None,
                  optimize: bool = False) -> Any:
        return ImagePredictor(folder, device=device, optimize=optimize, task=self, meta=meta)

    def describe(self, classes: Sequence[str], probs: np.ndarray) -> Prediction:
        """One image's probabilities -> its Prediction."""
        return describe_argmax(classes, probs)

    # ------------------------------------------------------------ evaluation

    def evaluate(self, predictor: Any, folder: Path, spec: ClassifierSpec, *, tta: bool = False,
                 progress: bool = True) -> dict:
        """Predict every image of folder/<class>/ and score it; bad files are listed, not fatal."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ToolkitError(f"evaluation folder {folder} not found")
        files, labels = self.eval_images(folder, predictor.meta)
        if not files:
            raise ToolkitError(f"no images in {folder} (expected {folder}/<class>/<image>)")
        unknown = sorted(set(labels) - set(predictor.classes))
        if unknown:
            raise ToolkitError(f"{folder} has class folders {unknown} that the model does not know "
                               f"(its classes: {', '.join(predictor.classes)})")
        good, bad = verify_images(files, progress=progress)
        good_set = set(good)
        labels = [y for f, y in zip(files, labels) if f in good_set]
        metrics = self.score_files(predictor, good, labels, spec.group, tta=tta, progress=progress)
        metrics["bad_files"] = [{"file": str(b.path), "reason": b.reason} for b in bad]
        metrics["data"] = str(folder)
        metrics["tta"] = tta
        return metrics

    def score_files(self, predictor: Any, files: list[Path], labels: list[str], group: str, *, tta: bool = False,
                    progress: bool = True) -> dict:
        probs = predictor.predict_files(files, tta=tta, progress=progress)
        return self.metrics(probs, labels, predictor.classes, files, group)

    # ------------------------------------------------------------ dashboard

    def card_rows(self, meta: dict[str, Any], metrics: dict[str, Any]) -> list[tuple[str, str]]:
        """Model-card rows of this kind (after the generic ones)."""
        return []

    def prediction_html(self, prediction: Prediction) -> str:
        """HTML of this kind's reading of a prediction, above the probability bars."""
        return ""

    def check_feedback_label(self, label: str) -> str:
        """A dashboard user's 'the right label is ...', checked before it becomes a folder."""
        return check_name(label, "label")

    def make_dashboard(self, spec: ClassifierSpec) -> Any | None:
        """A dashboard of this kind's own, or None for the classifier dashboard."""
        return None

    # ------------------------------------------------------------ sanity check

    def check_batches(self, spec: ClassifierSpec, data: Path | None, n: int, approach: str | None,
                      progress: bool = False) -> list[tuple[Any, tuple, Any, str]]:
        """(fresh model, inputs, targets, what) per model to overfit one balanced batch of `n` items."""
        import torch

        backbone = get_backbone(spec.arch)
        dataset = self.load_data(spec, data, progress=progress)
        train = [(f, y) for f, y, v in zip(dataset.files, dataset.labels, dataset.is_valid) if not v]
        picked = balanced(train, lambda item: item[1], n, spec.seed)
        inputs = (to_batch([load_squished(f, spec.size) for f, _ in picked], backbone.mean, backbone.std),)
        targets = torch.tensor([dataset.classes.index(y) for _, y in picked])
        taps = head_taps(spec.arch, spec.head_features)
        model = create_model(spec.arch, len(dataset.classes), spec.pretrained, taps=taps)
        return [(model, inputs, targets, spec.name)]
