"""`toolkit` commands. The registries: backbones and task kinds."""

from __future__ import annotations

import argparse

from toolkit.cli.base import command, emit


@command("backbones")
def cmd_backbones(args: argparse.Namespace) -> int:
    """List the registry's backbones and whether their pretrained weights are on this machine."""
    from toolkit.core.backbones import describe_backbones

    return emit(args, *describe_backbones())


@command("tasks")
def cmd_tasks(args: argparse.Namespace) -> int:
    """List the task kinds, the settings keys each owns, and the features each supports."""
    from toolkit.tasks.registry import describe_tasks

    return emit(args, *describe_tasks())
