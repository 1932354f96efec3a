"""The shared training recipe's parts, on fastai: a Learner over the registry's backbones, lr_find,
the frozen phase on cached body features, fine_tune's unfrozen phase, the best epoch kept.

The book's recipe (`vision_learner` + `lr_find` + `fine_tune`) with what a practitioner needs
around it: the body's ImageNet batch-norm statistics kept (`PretrainedBatchNormStats`), channels-
last memory, a CSV log, a loss history for the plot. Task kinds build their models and data and
call `make_learner` + `fit_learner` (`toolkit.tasks.base.Task.train` is the default recipe).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit.core.backbones import body_head_split, get_backbone, has_fastai_head, set_head_dropout, split_body
from toolkit.core.config import ClassifierSpec
from toolkit.core.errors import ToolkitError
from toolkit.core.metrics import pyplot
from toolkit.core.progress import progress_iter
from toolkit.data import Dataset


def data_fingerprint(dataset: Dataset) -> str:
    """sha256 over (relative path, label, split, size) of every file trained on or validated with."""
    digest = hashlib.sha256()
    for path, label, valid in zip(dataset.files, dataset.labels, dataset.is_valid):
        relative = path.relative_to(dataset.root) if path.is_relative_to(dataset.root) else path
        digest.update(f"{relative}\t{label}\t{int(valid)}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _loss_history_callback():
    from fastai.callback.core import Callback

    class LossHistory(Callback):
        """Train loss per batch and valid loss per epoch across every fit (frozen and unfrozen)."""

        order = 60

        def __init__(self):
            self.train, self.valid, self.iteration = [], [], 0

        def after_batch(self):
            if self.training:
                self.iteration += 1
                self.train.append((self.iteration, float(self.loss)))

        def after_epoch(self):
            values = self.recorder.values[-1] if self.recorder.values else []
            if len(values) > 1:
                self.valid.append((self.iteration, float(values[1])))

    return LossHistory()






FALLBACK_LR = 2e-3


def find_lr(learn, num_it: int, plot_path: Path) -> dict[str, float]:
    """fastai's lr_find with the valley and slide suggestions, plotted; robust to short runs."""
    import torch
    from fastai.callback.schedule import slide, valley

    plt = pyplot()
    learn.lr_find(num_it=max(num_it, 20), show_plot=False, suggest_funcs=None)
    lrs, losses = torch.tensor(learn.recorder.lrs), torch.tensor(learn.recorder.losses)
    n = len(lrs)
    lrs, losses = lrs[n // 10 : n - 5], losses[n // 10 : n - 5]
    finite = torch.isfinite(losses)
    if not finite.all():
        first_bad = int((~finite).nonzero()[0])
        lrs, losses = lrs[:first_bad], losses[:first_bad]
    found: dict[str, float] = {}
    points = []
    for func in (valley, slide):
        try:
            lr, point = func(lrs, losses, num_it)
        except (IndexError, ValueError, RuntimeError):  # too few points before divergence
            continue
        if np.isfinite(lr):
            found[func.__name__] = float(lr)
            points.append(point)
    learn.recorder.plot_lr_find(suggestions=points, nms=list(found))
    if "valley" not in found:
        found["valley"] = found.get("slide", FALLBACK_LR)
        found["fallback"] = 1.0
    found.setdefault("slide", found["valley"])
    plt.gcf().suptitle(f"lr_find: valley {found['valley']:.2e}, slide {found['slide']:.2e}")
    plt.gcf().savefig(plot_path, dpi=100)
    plt.close("all")
    return found


def make_learner(dls, model, out: Path, *, splitter: Callable = body_head_split, pretrained: bool = True,
                 progress: bool = True, keep_bn_stats: bool = True):
    """fastai Learner (cross-entropy, accuracy) with the body frozen when pretrained.

    Frozen phase = the pretrained body as a fixed function: its batch norms stay in eval mode with
    their ImageNet statistics (train_bn=False), so no gradient flows through the body (about 3x
    cheaper) and the head learns on exactly the features it will be served with. The statistics
    stay through the unfrozen phase too unless `keep_bn_stats` is off
    (`callbacks.PretrainedBatchNormStats`). Channels-last memory (fastai's ChannelsLast) makes
    convolutions about 1.5x faster on CPUs. On CUDA: mixed precision (bf16 where supported, else fp16
    with loss scaling), the same channels-last."""
    import fastai.callback.fp16  # noqa: F401  (to_fp16, to_bf16)
    from fastai.callback.channelslast import ChannelsLast
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    from toolkit.callbacks import PretrainedBatchNormStats

    cbs = [PretrainedBatchNormStats(keep_bn_stats), ChannelsLast()] if pretrained else [ChannelsLast()]
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, splitter=splitter,
                    path=out, model_dir=".", train_bn=False, cbs=cbs)
    if not progress:
        learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
    if pretrained:
        learn.freeze()
    if getattr(dls, "device", None) is not None and torch.device(dls.device).type == "cuda":
        # mixed precision on GPUs (fp32 master weights, so the exported weights stay fp32); on CPUs
        # bf16 training gained nothing over channels-last (BENCHMARKS.md), so fp32 there
        learn = learn.to_bf16() if torch.cuda.is_bf16_supported() else learn.to_fp16()
    return learn


def bf16_autocast(device: torch.device) -> bool:
    """Whether bfloat16 autocast speeds inference up here: a CPU with bf16 instructions (AVX512-BF16
    or AMX: about 2x on top of channels-last) or a CUDA device that supports it."""
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def pooled_features(body, pool, dl, *, flip: bool = False, progress: bool = False, label: str = "",
                    stem=None, keep: Callable[[torch.Tensor], None] | None = None):
    """The frozen body's output for every batch of `dl`, pooled by `pool` (the head's own pooling and
    flatten, `head[:2]`: fastai's concat pooling, or `MultiPool` over the final map and the taps), and the
    targets: (N, pooled features), (N,). Runs in channels-last memory, in bfloat16 where the hardware has it
    (features for a head to learn on). With `stem` (`backbones.split_body`: `body` is then its top), the
    batch goes through stem, then body, and `keep` gets the stem's maps (for `top_learner`)."""
    feats, targets = [], []
    body.eval().to(memory_format=torch.channels_last)
    if stem is not None:
        stem.eval().to(memory_format=torch.channels_last)
    device = next(body.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast(device)):
        for xb, yb in progress_iter(dl, len(dl), label, progress):
            x = torch.as_tensor(xb.flip(3) if flip else xb).to(device).contiguous(memory_format=torch.channels_last)
            if stem is not None:
                x = stem(x)
                keep(x)
            maps = body(x)
            maps = tuple(m.float() for m in maps) if isinstance(maps, tuple) else maps.float()
            feats.append(pool(maps).cpu())
            targets.append(torch.as_tensor(yb).cpu())
    return torch.cat(feats), torch.cat(targets)


def image_features(body, pool, files: Sequence[Path], size: int, mean: Sequence[float], std: Sequence[float], *,
                   bs: int = 64, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pooled body features of image files, plain and mirrored, (N, pooled features) each (`pool`: the
    head's `head[:2]`, as in `pooled_features`): the files
    squished and normalised as the predictor does (`load_squished` + `to_batch`), decoded a batch at
    a time so memory stays bounded."""
    from toolkit.core.images import load_squished, to_batch

    def batches():
        for start in range(0, len(files), bs):
            chunk = files[start:start + bs]
            yield to_batch([load_squished(f, size) for f in chunk], mean, std), torch.zeros(len(chunk))

    n_batches = (len(files) + bs - 1) // bs
    plain, _ = pooled_features(body, pool, _Sized(batches, n_batches), progress=progress, label="body features")
    flip, _ = pooled_features(body, pool, _Sized(batches, n_batches), flip=True, progress=progress,
                              label="body features (mirrored)")
    return plain.numpy(), flip.numpy()


class _Sized:
    """An iterable of batches with a length (for the progress bar)."""

    def __init__(self, make, n: int):
        self.make, self.n = make, n

    def __iter__(self):
        return iter(self.make())

    def __len__(self) -> int:
        return self.n


def dataset_learner(train_ds, valid_ds, model, bs: int, valid_bs: int, device, out: Path, loss_func, *,
                    progress: bool = True, **kwargs):
    """A fastai Learner (accuracy, out/ as its folder) over two torch Datasets: the training one shuffled in
    batches of `bs` (the last partial batch dropped), the validation one in batches of `valid_bs`. The
    cached-feature, head-only and top-phase learners are all this."""
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.metrics import accuracy

    dls = DataLoaders(DataLoader(train_ds, bs=bs, shuffle=True, drop_last=len(train_ds) > bs),
                      DataLoader(valid_ds, bs=valid_bs), device=device)
    learn = Learner(dls, model, loss_func=loss_func, metrics=accuracy, path=out, model_dir=".", **kwargs)
    if not progress:
        learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
    return learn


def head_learner(head, x_train, y_train, x_valid, y_valid, bs: int, out: Path, loss_func, *, progress: bool = True):
    """A fastai Learner that trains the head's layers after pooling (`head[2:]`) on pooled features."""
    import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, lr_find)
    from torch.utils.data import TensorDataset

    return dataset_learner(TensorDataset(torch.as_tensor(x_train), torch.as_tensor(y_train)),
                           TensorDataset(torch.as_tensor(x_valid), torch.as_tensor(y_valid)), head[2:], bs, bs * 4,
                           torch.device("cpu"), out, loss_func, progress=progress)


class StemMaps:
    """The body stem's maps of a set of images (`split_body`), written a batch at a time to a memory-mapped
    float16 file, so that memory stays bounded however many images there are."""

    def __init__(self, path: Path, n: int):
        self.path, self.n, self.rows, self.array = path, n, 0, None

    def keep(self, maps: torch.Tensor) -> None:
        if self.array is None:
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float16,
                                                   shape=(self.n, *maps.shape[1:]))
        self.array[self.rows:self.rows + len(maps)] = maps.to(torch.float16).cpu().numpy()
        self.rows += len(maps)


class _StemMapData(torch.utils.data.Dataset):
    """Cached stem maps and targets; with `mirrored`, each item is the image's or its mirror image's maps
    at random (the top phase's augmentation)."""

    def __init__(self, plain: StemMaps, targets: torch.Tensor, mirrored: StemMaps | None = None):
        self.plain, self.mirrored, self.targets = plain, mirrored, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        maps = self.mirrored if self.mirrored is not None and torch.rand(()) < 0.5 else self.plain
        return torch.from_numpy(np.asarray(maps.array[i], dtype=np.float32)), self.targets[i]


def feature_learner(learn, out: Path, *, progress: bool = True, top_start: str = "", maps_dir: Path | None = None):
    """A Learner for the frozen phase that trains `learn`'s head (the same modules) on cached body
    features of every training image and its mirror image: the frozen body is a fixed function, so
    it runs once instead of once per epoch, and the head gets as many epochs as it needs.

    With `top_start` (the registry's) and `maps_dir`, the body runs as stem + top (`split_body`) and the
    stem's maps are kept in `maps_dir` for the top phase (`top_learner`): returned as the learner's
    `stem_maps` (train, mirrored, valid, the targets, the top), else None. One process only."""
    from torch.utils.data import TensorDataset

    from toolkit import distributed

    body, head = learn.model[0], learn.model[1]
    train_plain = learn.dls.train.new(shuffle=False, drop_last=False, after_batch=learn.dls.valid.after_batch)
    split = split_body(body, top_start) if top_start and maps_dir is not None else None
    kept: dict[str, StemMaps] = {}

    def features(dl, flip: bool, label: str, name: str):  # in several processes: each its slice, gathered
        if split is not None:
            kept[name] = StemMaps(maps_dir / f"{name}.npy", len(dl.dataset))
            return pooled_features(split[1], head[:2], dl, flip=flip, progress=progress, label=label,
                                   stem=split[0], keep=kept[name].keep)
        x, y = pooled_features(body, head[:2], distributed.shard(dl), flip=flip, progress=progress, label=label)
        n = len(dl.dataset)
        return distributed.gather_rows(x, n), distributed.gather_rows(y, n)

    x_train, y_train = features(train_plain, False, "body features (train)", "train")
    x_flip, _ = features(train_plain, True, "body features (mirrored)", "mirrored")
    x_valid, y_valid = features(learn.dls.valid, False, "body features (valid)", "valid")
    bs = learn.dls.train.bs
    features = dataset_learner(TensorDataset(torch.cat([x_train, x_flip]), torch.cat([y_train, y_train])),
                               TensorDataset(x_valid, y_valid), head[2:], bs, bs * 4, learn.dls.device, out,
                               learn.loss_func, progress=progress, wd=learn.wd)
    features.stem_maps = None if split is None else {**kept, "y_train": y_train, "y_valid": y_valid, "top": split[1]}
    return features


def top_learner(learn, stem_maps: dict, out: Path, *, progress: bool = True):
    """A Learner for the top phase: the body's top stages (`split_body`) and the head, the same modules as
    `learn.model`'s, trained on the stem maps `feature_learner` kept (each image or its mirror image at
    random); the stem stays fixed and never runs again. Batch norms as in `learn` (`PretrainedBatchNormStats`)."""
    from fastai.callback.channelslast import ChannelsLast

    from toolkit.callbacks import PretrainedBatchNormStats

    bs = learn.dls.train.bs
    keeper = next((cb for cb in learn.cbs if isinstance(cb, PretrainedBatchNormStats)), PretrainedBatchNormStats())
    return dataset_learner(_StemMapData(stem_maps["train"], stem_maps["y_train"], stem_maps["mirrored"]),
                           _StemMapData(stem_maps["valid"], stem_maps["y_valid"]),
                           nn.Sequential(stem_maps["top"], learn.model[1]), bs, bs * 2, learn.dls.device, out,
                           learn.loss_func, progress=progress, wd=learn.wd, train_bn=False,
                           splitter=lambda m: [list(m[0].parameters()), list(m[1].parameters())],
                           cbs=[PretrainedBatchNormStats(keeper.keep), ChannelsLast()])


def training_step_seconds(learn, batches: int = 3) -> float:
    """Seconds of one training step (forward, loss, backward) of `learn`'s model on a training batch,
    as the unfrozen phase runs it (train mode, the body's batch norms as `PretrainedBatchNormStats`
    keeps them, channels-last): the fastest of `batches` tries. Weights, gradients and batch-norm
    statistics are left as they were."""
    from toolkit.callbacks import PretrainedBatchNormStats

    model = learn.model
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    xb, yb = learn.dls.train.one_batch()  # plain tensors: through fastai's TensorImage the same step is
    xb = xb.as_subclass(torch.Tensor).contiguous(memory_format=torch.channels_last)  # ~1.5x slower, unlike fit's
    yb = yb.as_subclass(torch.Tensor)
    model.to(memory_format=torch.channels_last)  # as fastai's ChannelsLast does before the fit
    model.train()
    keeper = next((cb for cb in learn.cbs if isinstance(cb, PretrainedBatchNormStats)), None)
    if keeper is not None:  # fastai's add_cb already gave it `learn`
        keeper.before_train()
    best = float("inf")
    try:
        for _ in range(batches):
            started = time.perf_counter()
            learn.loss_func(model(xb), yb).backward()
            best = min(best, time.perf_counter() - started)
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
    return best


def epochs_in_budget(learn, epochs: int, spec: ClassifierSpec, started: float, log: Callable[[str], None] = print,
                     phase: str = "unfrozen") -> int:
    """How many of `epochs` of `learn`'s fit fit in spec's `time_budget` minutes counted from `started` (all
    of them when time_budget = 0): one epoch ~ its training steps plus a forward pass of validation
    (a third of a step per batch), and one more validation pass is kept for scoring and export."""
    if not spec.time_budget or not epochs:
        return epochs
    step = training_step_seconds(learn)
    valid_s = len(learn.dls.valid) * step / 3
    epoch_s = len(learn.dls.train) * step + valid_s
    left = spec.time_budget * 60 - (time.time() - started) - valid_s - 30
    fit = max(0, min(epochs, int(left // epoch_s)))
    if fit < epochs:
        log(f"time_budget {spec.time_budget:g} min: {fit} of {epochs} {phase} epoch(s) fit (about "
            f"{epoch_s / 60:.1f} min each on this machine, {max(left, 0) / 60:.1f} min left); "
            f"set time_budget = 0 to run them all")
    return fit


# the top phase's lr: half lr_find's for the head (as the unfrozen phase), a tenth of that for the top stages
# (BENCHMARKS.md: at lr_find's full lr it lost about a point on held-out folds; at half it is level there)
TOP_LR_MULT = 10


def fit_top(learn, stem_maps: dict, spec: ClassifierSpec, out: Path, best, extra_cbs: Sequence, lr: float,
            started: float, log: Callable[[str], None] = print, progress: bool = True) -> tuple[int, list]:
    """The top phase (`top_epochs`, between the cached head and the unfrozen phase): the body's top stages and
    the head train on the stem maps the frozen phase kept (`top_learner`), as many epochs as fit the time
    budget. `best` (the fit's SaveModelCallback) is raised where an epoch beats the head alone, whose weights
    come back otherwise. Returns the epochs run and their recorded values."""
    from fastai.callback.tracker import SaveModelCallback

    top = top_learner(learn, stem_maps, out, progress=progress)
    epochs = epochs_in_budget(top, spec.top_epochs, spec, started, log, phase="top")
    if not epochs:
        return 0, []
    keeper = SaveModelCallback(monitor="accuracy", fname="best_top", reset_on_fit=False)
    keeper.best = best.best
    top.save("best_top")  # the head alone, loaded back at the end if no top epoch beats it
    try:
        top.fit_one_cycle(epochs, slice(lr / 2 / TOP_LR_MULT, lr / 2), pct_start=0.3, div=5.0,
                          cbs=[*(cb for cb in extra_cbs if cb is not best), keeper])
    finally:
        (out / "best_top.pth").unlink(missing_ok=True)
    if keeper.best > best.best:
        best.best = keeper.best
        learn.save("best")
    log(f"top phase: {epochs} epoch(s) of the body's top stages on cached stem maps, best valid accuracy "
        f"{best.best:.2%}")
    return epochs, [list(v) for v in top.recorder.values]


def fit_learner(learn, spec: ClassifierSpec, out: Path, log: Callable[[str], None] = print,
                progress: bool = True, callbacks: Sequence = (), started: float | None = None) -> dict:
    """lr_find (plotted to out/lr_find.png) then fine_tune with the CSV log, the loss history and the
    best epoch across both phases loaded back; returns lr, lr_find, history and fit_seconds.
    `callbacks` are extra fastai callbacks for the fit (e.g. TensorBoard in sweeps).

    For a body + fastai head, the frozen phase trains the head on cached body features
    (`feature_learner`); the unfrozen phase is then fine_tune's second half, with as many of
    `epochs` as fit in `time_budget` minutes from `started` (the training's start; default: now).
    Between them, `top_epochs` of the top phase (`fit_top`): the body's top stages and the head on the
    stem maps the frozen phase kept. The returned `epochs_run` and `top_epochs_run` say how many ran."""
    from toolkit import distributed

    if spec.epochs + spec.freeze_epochs == 0:
        raise ToolkitError(f"[{spec.name}] epochs = 0 and freeze_epochs = 0: nothing would train; set either above 0")
    learn.wd = spec.wd  # settings wd and dropout (fastai's ps), also for the cached head below
    set_head_dropout(learn.model, spec.dropout)
    cached = spec.pretrained and spec.freeze_epochs > 0 and has_fastai_head(learn.model)
    maps_dir = None  # the top phase's stem maps: one process, memory-mapped files removed after the fit
    _remove_stale_stem_maps(out)
    if cached and spec.top_epochs and distributed.world_size() > 1:
        log(f"top_epochs = {spec.top_epochs}: the top phase runs in one process only; skipped under --processes")
    elif cached and spec.top_epochs:
        maps_dir = Path(tempfile.mkdtemp(prefix=f"stem-maps-{os.getpid()}-", dir=out))
    try:
        return _fit(learn, spec, out, log, progress, callbacks, started, cached, maps_dir)
    finally:
        if maps_dir is not None:
            shutil.rmtree(maps_dir, ignore_errors=True)


def _remove_stale_stem_maps(out: Path) -> None:
    """Remove the stem-map folders of runs that were killed (`stem-maps-<pid>-*` whose process is gone)."""
    for folder in out.glob("stem-maps-*-*"):
        try:
            os.kill(int(folder.name.split("-")[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _fit(learn, spec: ClassifierSpec, out: Path, log: Callable[[str], None], progress: bool, callbacks: Sequence,
         started: float | None, cached: bool, maps_dir: Path | None) -> dict:
    import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, also in ranks that skip lr_find)
    from fastai.callback.progress import CSVLogger
    from fastai.callback.tracker import SaveModelCallback

    from toolkit import distributed

    main = distributed.is_main()
    history = _loss_history_callback()
    if main:
        (out / "history.csv").unlink(missing_ok=True)
    best = SaveModelCallback(monitor="accuracy", fname="best", reset_on_fit=False)
    extra_cbs = [*([CSVLogger(fname="history.csv", append=True)] if main else []), history, best, *callbacks]
    fit_started = time.time()
    started = fit_started if started is None else started
    epochs_run, top_run = spec.epochs, 0
    frozen = learn
    if cached:
        frozen = feature_learner(learn, out, progress=progress, maps_dir=maps_dir,
                                 top_start=get_backbone(spec.arch).top_start)
    found = None
    if main:  # lr_find runs once, in rank 0 alone
        with distributed.single_process():
            found = find_lr(frozen, spec.lr_find_iters, out / "lr_find.png")
    found = distributed.broadcast(found)
    lr = spec.lr if spec.lr is not None else found["valley"]
    log(f"lr_find: valley {found['valley']:.2e}, slide {found['slide']:.2e}; using lr {lr:.2e}"
        + (" (set by lr / --lr)" if spec.lr is not None else ""))
    values = []
    if cached:
        if main:  # the head on in-memory features: rank 0 alone; DDP hands its weights to every rank
            with distributed.single_process():
                frozen.fit_one_cycle(spec.freeze_epochs, lr, cbs=[cb for cb in extra_cbs if cb is not best])
                values = [list(v) for v in frozen.recorder.values]
                learn.save("best")
        values = distributed.broadcast(values)
        best.best = float(values[-1][2])  # this head on the frozen body = the full model's accuracy
        log(f"frozen phase: head on cached body features, valid accuracy {best.best:.2%}")
        if frozen.stem_maps is not None:  # one process: the stem maps were kept for the top phase
            top_run, top_values = fit_top(learn, frozen.stem_maps, spec, out, best, extra_cbs, lr, started, log,
                                          progress)
            values += top_values
        if spec.epochs:  # epochs = 0 (and top_epochs = 0): quick mode, the head on cached features is the model
            learn.unfreeze()
            epochs_run = distributed.broadcast(epochs_in_budget(learn, spec.epochs, spec, started, log)
                                               if main else None)
        if epochs_run:
            with distributed.data_parallel(learn):
                learn.fit_one_cycle(epochs_run, slice(lr / 2 / spec.lr_mult, lr / 2), pct_start=0.3, div=5.0,
                                    cbs=extra_cbs)
    elif spec.pretrained and spec.freeze_epochs:  # not body + fastai head (the siamese pair model)
        with distributed.data_parallel(learn):
            learn.fine_tune(spec.epochs, base_lr=lr, freeze_epochs=spec.freeze_epochs, lr_mult=spec.lr_mult,
                            cbs=extra_cbs)
    elif spec.pretrained:  # freeze_epochs = 0: straight to fine_tune's unfrozen half
        learn.unfreeze()
        with distributed.data_parallel(learn):
            learn.fit_one_cycle(spec.epochs, slice(lr / spec.lr_mult, lr), pct_start=0.3, div=5.0, cbs=extra_cbs)
    else:
        with distributed.data_parallel(learn):
            learn.fit_one_cycle(spec.epochs + spec.freeze_epochs, lr, cbs=extra_cbs)
    fit_seconds = time.time() - fit_started
    distributed.barrier()  # every rank has loaded the best epoch before rank 0 removes its file
    if main:
        (out / "best.pth").unlink(missing_ok=True)  # the best epoch is loaded into learn.model
    values += [list(v) for v in getattr(learn.recorder, "values", [])] if epochs_run or not cached else []
    return {"lr": lr, "lr_find": found, "history": history, "fit_seconds": fit_seconds, "values": values,
            "epochs_run": epochs_run, "top_epochs_run": top_run}

