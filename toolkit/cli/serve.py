"""`toolkit` commands. The faces: the apps' notebooks and serving them."""

from __future__ import annotations

import argparse
from pathlib import Path

from toolkit.cli.base import BIND, arg, command, emit, log, out


@command("apps")
def cmd_apps(args: argparse.Namespace) -> int:
    """Write apps/NAME.ipynb for every classifier of settings.ini, and apps/index.ipynb."""
    from toolkit.ui.apps import write_apps

    paths = write_apps(args.settings)
    return emit(args, [str(p) for p in paths], [f"wrote {p}" for p in paths])


@command("serve", *BIND, arg("--timeout", type=float, default=120, help="seconds to wait for Voila to start"),
         arg("--max-kernels", type=int, default=8, help="dashboard kernels alive at once (default 8)"))
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve every classifier's dashboard and the cleaning app with Voila (until Ctrl-C)."""
    from toolkit.settings import load_settings
    from toolkit.ui.serve import serve_dashboards

    return serve_dashboards(load_settings(args.settings), args.host, args.port, token=not args.no_token, out=out,
                            timeout=args.timeout, allowed_hosts=args.allow_host or (), max_kernels=args.max_kernels)


@command("deploy", arg("names", nargs="*", metavar="NAME", help="classifiers of settings.ini"),
         arg("--all", action="store_true", dest="everything", help="every trained classifier in one bundle"),
         arg("--out", type=Path, required=True, help="the bundle folder to write (replaced if it is a bundle)"))
def cmd_deploy(args: argparse.Namespace) -> int:
    """Write a self-contained folder (models, notebooks, serving code, start.sh, requirements.txt,
    Dockerfile, README) that serves the dashboards and the JSON API anywhere."""
    from toolkit.settings import load_settings
    from toolkit.stages.deploy import deploy

    result = deploy(load_settings(args.settings), args.names, args.out, everything=args.everything, log=log)
    return emit(args, result, [result["out"]])
