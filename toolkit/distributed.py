"""Data-parallel training on Accelerate (`toolkit train NAME --processes N`, or `accelerate launch
-m toolkit train NAME` on several GPUs or nodes): every process runs the same `Task.train`; fastai's
`DistributedTrainer` (what `learn.distrib_ctx()` adds) wraps the model in DistributedDataParallel
through an `accelerate.Accelerator` and gives each process its shard of every batch, so the batch
size of settings.ini is the per-process one. The cached frozen phase shards the body's feature
computation (each rank its contiguous slice, gathered with `accelerate.utils.gather`); lr_find and
the head's fit on those features run once, on rank 0, and DDP hands rank 0's weights to every rank
when the unfrozen phase starts; only rank 0 writes models/NAME/.

On CPUs the processes talk over gloo and are started with torch's elastic launcher (`torchrun`,
which is also what `accelerate launch --multi_gpu` runs): Accelerate's own CPU multi-process
launch needs mpirun / oneCCL. On CUDA the same code gets NCCL, one GPU per process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def world_size() -> int:
    """Processes in this training (1 when not launched distributed)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def init() -> Any:
    """Join the process group (gloo on CPU, NCCL on CUDA) through Accelerate; None when single."""
    if world_size() == 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not _cuda())  # Accelerate takes a torchrun launch on CPUs as MULTI_CPU only when told


def barrier() -> None:
    if world_size() > 1:
        init().wait_for_everyone()


def broadcast(obj: Any) -> Any:
    """rank 0's `obj` on every rank (a picklable object)."""
    if world_size() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def gather_rows(tensor: Any, n: int) -> Any:
    """Every rank's equal-length slice concatenated in rank order, trimmed to the first `n` rows."""
    if world_size() == 1:
        return tensor
    from accelerate.utils import gather

    return gather(tensor.to(init().device).contiguous()).cpu()[:n]


@contextmanager
def single_process() -> Iterator[None]:
    """Hide the process group from fastai's helpers (num_distrib, rank_distrib, distrib_barrier)
    for code that only rank 0 runs (lr_find saves and reloads the model with a barrier in between,
    which would wait forever for ranks that are not running it)."""
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ["WORLD_SIZE"], os.environ["RANK"] = "1", "0"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _shard_classes():
    from fastai.distributed import DistributedDL, DistributedTrainer

    class ShardDL(DistributedDL):
        """fastai's DistributedDL with its index broadcast on any backend (fastai's moves the index
        list to CUDA, which gloo on CPU cannot take)."""

        def _broadcast(self, t, rank):
            from accelerate.utils import broadcast_object_list

            return broadcast_object_list([list(t)], from_process=rank)[0]

    class Trainer(DistributedTrainer):
        """fastai's DistributedTrainer with ShardDL."""

        def _wrap_dl(self, dl):
            return dl if isinstance(dl, DistributedDL) else ShardDL(dl, device=self.learn.dls.device)

    return ShardDL, Trainer


def shard(dl: Any) -> Any:
    """This rank's contiguous slice of a (non-shuffled) fastai DataLoader, padded to equal lengths."""
    return _shard_classes()[0](dl) if world_size() > 1 else dl


@contextmanager
def data_parallel(learn: Any) -> Iterator[Any]:
    """fastai's `distrib_ctx` (DDP through an Accelerator) when launched with several processes,
    without SyncBatchNorm: the body's batch norms keep their pretrained statistics (eval mode), so
    there is nothing to synchronise; a no-op in a single process."""
    if world_size() == 1:
        yield learn
        return
    from fastai.callback.progress import ProgressCallback

    trainer = _shard_classes()[1](sync_bn=False, cpu=not _cuda())
    learn.add_cb(trainer)
    if not is_main():
        learn.remove_cb(ProgressCallback)
    try:
        yield learn
    finally:
        learn.remove_cb(trainer)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_command(n: int, argv: Sequence[str]) -> list[str]:
    """The command that runs `toolkit ARGV` in `n` processes on this machine (torch's elastic
    launcher, a free port, gloo on CPU / NCCL on CUDA inside Accelerate)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", "toolkit", *argv]


_NOISE = ("*****", "Setting OMP_NUM_THREADS", "W1", "I1", "[W", "[I")


def launch(n: int, argv: Sequence[str], log=print) -> int:
    """Run `toolkit ARGV` in `n` processes; stdout passes through (rank 0 alone prints), stderr
    lines are forwarded without the launcher's own chatter, and a failure ends in one line."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    proc = subprocess.Popen(launch_command(n, argv), stderr=subprocess.PIPE, text=True, env=env)
    errors, failing = [], False
    assert proc.stderr is not None
    for line in proc.stderr:
        line = re.sub(r"^\[rank\d+\]:\s?", "", line.rstrip("\n"))
        if line.startswith("error: "):
            errors.append(line)
            continue
        if re.match(r"^[\w.]+(Error|Exception): ", line):
            errors.append(f"error: {line[:300]}")
        failing = failing or "Traceback" in line or "ChildFailedError" in line
        if not failing and line and not line.startswith(_NOISE) and "torch.distributed" not in line:
            log(line)
    code = proc.wait()
    if code != 0:
        log(errors[0] if errors else f"error: training in {n} processes failed (exit {code}); run without "
                                     "--processes to see the error")
        return 1 if code not in (1, 2) else code
    return 0
