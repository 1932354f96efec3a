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

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toolkit.core.config import ClassifierSpec
from toolkit.core.errors import ToolkitError
from toolkit.core.progress import progress_iter
from toolkit.tasks import task_of

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








def check(spec: ClassifierSpec, data: Path | None = None, *, n: int = 16, steps: int = 40, lr: float = 1e-3,
          threshold: float = 0.1, labels: str = "real", approach: str | None = None,
          progress: bool = False) -> list[CheckResult]:
    """Overfit one batch for spec's classifier (for task = pairs with approach = both: each approach)."""
    torch.manual_seed(spec.seed)
    task = task_of(spec)
    task.require("check", spec.name, "check")
    results = []
    for model, inputs, targets, what in task.check_batches(spec, data, n, approach, progress):
        result = overfit_batch(model, inputs, targets, steps=steps, lr=lr, threshold=threshold, labels=labels,
                               seed=spec.seed, progress=progress)
        result.what = what
        results.append(result)
    return results
