"""`toolkit check NAME`: can the model overfit one small batch? (Karpathy's first sanity check.)

A fresh model (pretrained body, new head, everything trainable) takes `steps` Adam steps on one
fixed batch of `n` training items, without augmentation. The loss is measured in eval mode before
and after. It passes when the loss falls below `threshold`: data, labels, model, loss and
optimiser are wired together so that the network can learn what it is shown. A pipeline that
hands the model labels unrelated to its inputs (`labels = "random"`: new random labels at every
step, as a loader that shuffles labels apart from images would) cannot pass, whatever the budget.
A *fixed* random labelling can be memorised by a large network given enough steps; within a small
budget it is learnt far more slowly than real labels (see docs/ARCHITECTURE.md, "pairs").
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.core.errors import ToolkitError
from toolkit.core.progress import progress_iter
from toolkit.settings import ClassifierSpec

LABEL_MODES = ("real", "shuffled", "random")


@dataclass
class CheckResult:
    """What `overfit_batch` saw: the losses before and after, and whether it passed."""

    passed: bool
    loss_before: float
    loss_after: float
    steps: int
    n: int
    labels: str
    threshold: float
    what: str = ""

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict} {self.what}: loss {self.loss_before:.3f} -> {self.loss_after:.3f} after {self.steps} "
                f"steps on {self.n} items ({self.labels} labels; pass: below {self.threshold})")

    def as_dict(self) -> dict:
        return asdict(self)


def overfit_batch(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor, *,
                  steps: int = 40, lr: float = 1e-3, threshold: float = 0.1, labels: str = "real",
                  seed: int = 42, progress: bool = False) -> CheckResult:
    """Train `model` on one batch for `steps` steps; `labels` real, shuffled (one fixed random
    permutation) or random (new random labels every step)."""
    if labels not in LABEL_MODES:
        raise ToolkitError(f"labels {labels!r}: use one of {', '.join(LABEL_MODES)}")
    generator = torch.Generator().manual_seed(seed)
    n_classes = int(targets.max()) + 1 if len(targets) else 2
    if labels == "shuffled":
        targets = targets[torch.randperm(len(targets), generator=generator)]
    loss_func = torch.nn.CrossEntropyLoss()

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(loss_func(model(*inputs), targets))

    torch.manual_seed(seed)
    before = eval_loss()
    for param in model.parameters():
        param.requires_grad_(True)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in progress_iter(range(steps), steps, "overfitting one batch", progress):
        step_targets = (torch.randint(0, n_classes, targets.shape, generator=generator) if labels == "random"
                        else targets)
        optimiser.zero_grad()
        loss = loss_func(model(*inputs), step_targets)
        loss.backward()
        optimiser.step()
    after = eval_loss()
    return CheckResult(after < threshold, round(before, 4), round(after, 4), steps, len(targets), labels, threshold)


def _balanced(items: list, key: Callable, n: int, seed: int) -> list:
    """`n` items (seeded) spread evenly over the values of key(item)."""
    rng = random.Random(seed)
    by_key: dict = {}
    for item in items:
        by_key.setdefault(key(item), []).append(item)
    for values in by_key.values():
        rng.shuffle(values)
    picked, round_ = [], 0
    while len(picked) < n and any(round_ < len(v) for v in by_key.values()):
        picked += [v[round_] for _, v in sorted(by_key.items(), key=lambda kv: str(kv[0])) if round_ < len(v)]
        round_ += 1
    return picked[:n]


def _normalise(arrays: list[np.ndarray], mean, std) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def check_batch(spec: ClassifierSpec, data: Path | None = None, *, n: int = 16, approach: str | None = None,
                progress: bool = False) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor, str]:
    """A fresh model and one balanced batch of `n` training items for spec's task (and approach)."""
    from toolkit.core.backbones import create_model, get_backbone

    backbone = get_backbone(spec.arch)
    if spec.task == "pairs":
        from toolkit.pairs import create_pair_model, decode_pairs, load_pair_data, stack_pair

        approach = approach or ("siamese" if spec.approach == "both" else spec.approach)
        pairs = _balanced(load_pair_data(spec, data, progress=progress).train, lambda p: p.same, n, spec.seed)
        arrays = decode_pairs(pairs, spec.size, progress=progress)
        if approach == "stacked":
            inputs = (_normalise([stack_pair(arrays[p.a], arrays[p.b], spec.size) for p in pairs],
                                 backbone.mean, backbone.std),)
        else:
            inputs = tuple(_normalise([arrays[getattr(p, side)] for p in pairs], backbone.mean, backbone.std)
                           for side in ("a", "b"))
        targets = torch.tensor([int(p.same) for p in pairs])
        return create_pair_model(approach, spec.arch, spec.pretrained), inputs, targets, f"{spec.name} ({approach})"
    from toolkit.data import load_dataset, load_resized

    dataset = load_dataset(spec, data, progress=progress)
    train = [(f, y) for f, y, v in zip(dataset.files, dataset.labels, dataset.is_valid) if not v]
    picked = _balanced(train, lambda item: item[1], n, spec.seed)
    inputs = (_normalise([load_resized(f, spec.size) for f, _ in picked], backbone.mean, backbone.std),)
    targets = torch.tensor([dataset.classes.index(y) for _, y in picked])
    return create_model(spec.arch, len(dataset.classes), spec.pretrained), inputs, targets, spec.name


def check(spec: ClassifierSpec, data: Path | None = None, *, n: int = 16, steps: int = 40, lr: float = 1e-3,
          threshold: float = 0.1, labels: str = "real", approach: str | None = None,
          progress: bool = False) -> list[CheckResult]:
    """Overfit one batch for spec's classifier (for task = pairs with approach = both: each approach)."""
    torch.manual_seed(spec.seed)
    approaches = [approach] if approach else (["stacked", "siamese"] if spec.task == "pairs" and
                                              spec.approach == "both" else [None])
    results = []
    for one in approaches:
        model, inputs, targets, what = check_batch(spec, data, n=n, approach=one, progress=progress)
        result = overfit_batch(model, inputs, targets, steps=steps, lr=lr, threshold=threshold, labels=labels,
                               seed=spec.seed, progress=progress)
        result.what = what
        results.append(result)
    return results
