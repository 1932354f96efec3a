"""`toolkit serve` and `toolkit clean`'s app: Voilà with Jupyter's protections kept on.

- A token by default, as Jupyter does: a fresh random token per start (`new_token`), handed to
  Voilà in the environment ($JUPYTER_TOKEN, read by jupyter_server's identity provider; never on
  the command line, where `ps` would show it); the printed URLs carry `?token=...`, and the first
  request with it sets a login cookie. `--no-token` opts out (refused with a non-loopback bind).
- The Host check on: Voilà sets tornado's `allow_remote_access = True`, which turns off
  jupyter_server's check of the Host header (DNS rebinding); `--Voila.tornado_settings` turns it
  back off, so only loopback addresses, `localhost` and the names given with `--allow-host NAME`
  (repeatable) are accepted; any other Host gets 403. A bind to a host *name* allows that name. A
  bind to a non-loopback IP address (0.0.0.0, a LAN address) without `--allow-host` turns the
  check off as jupyter_server itself does for such binds, because its check accepts no IP literal
  but loopback; the token still guards every page. Every command that binds a non-loopback
  address prints a warning.
- A cap on live kernels: at most `MAX_KERNELS` (`--max-kernels`) at once (`kernel_cap`); kernels
  of closed pages (no websocket left) are culled after `KERNEL_IDLE_S` idle seconds.
- Upload and websocket limits agree: an upload (at most `dashboard.MAX_FILES` files of
  `dashboard.MAX_UPLOAD_BYTES` each) travels in one websocket message, so tornado's
  `websocket_max_message_size` (10 MiB by default) is raised to `WEBSOCKET_MAX_MESSAGE_BYTES`.
- Voilà dies with this process (see `toolkit.ui.voila`); TERM or Ctrl-C stops it and its kernels.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from toolkit.core.errors import ToolkitError

LOOPBACK_NAMES = ("localhost",)
MAX_KERNELS = 8  # dashboard kernels alive at once (about 1 GB each with fastai)
CLEAN_MAX_KERNELS = 4  # the cleaning app's server
KERNEL_IDLE_S = 300  # a kernel with no page connected is culled after this many idle seconds
CULL_INTERVAL_S = 60
UPLOAD_FILES = 16  # = toolkit.ui.dashboard.MAX_FILES (checked by the tests)
UPLOAD_FILE_BYTES = 20 * 1024 * 1024  # = toolkit.ui.dashboard.MAX_UPLOAD_BYTES (checked by the tests)
WEBSOCKET_MAX_MESSAGE_BYTES = UPLOAD_FILES * UPLOAD_FILE_BYTES + 8 * 1024 * 1024  # + room for the message frame
STOP_GRACE_S = 5  # seconds Voilà gets after SIGTERM before its process group is killed

Out = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def new_token() -> str:
    """A random token, as long as Jupyter's (48 hex digits)."""
    return secrets.token_hex(24)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host.strip("[]").lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return host in ("", "*")


def _token(token: str | bool) -> str:
    if token is True:
        return new_token()
    return token or ""


def check_bind(host: str, token: str, allowed_hosts: Sequence[str] = ()) -> str | None:
    """The warning to print for a non-loopback bind (None on loopback); ToolkitError for a
    non-loopback bind without a token, or a bad --allow-host name."""
    for name in allowed_hosts:
        if not name or any(c in name for c in "/:@ \t") or name != name.strip():
            raise ToolkitError(f"--allow-host {name!r}: give a host name such as myhost.lan (no port, no scheme)")
    if is_loopback(host):
        return None
    if not token:
        raise ToolkitError(f"--no-token with --host {host}: anyone who can reach this machine could use the "
                           "dashboards; keep the token or bind 127.0.0.1")
    how = ("the Host check allows " + ", ".join([*([] if _is_ip(host) else [host]), *allowed_hosts])
           if allowed_hosts or not _is_ip(host) else
           "the Host check is off for this IP bind (as in Jupyter), the token guards every page; "
           "--allow-host NAME keeps it on for that name")
    return (f"warning: bound to {host}, not loopback: anyone who can reach this machine and has the token "
            f"can use the dashboards ({how})")


def voila_security_args(host: str, allowed_hosts: Sequence[str] = (), *, token: str,
                        max_kernels: int = MAX_KERNELS, host_check: bool = True) -> list[str]:
    """Voilà options for the token, the Host check, the kernel cap and culling, and the websocket
    limit (the token itself goes in $JUPYTER_TOKEN, see `voila_env`). host_check=False (a
    deployed bundle only) accepts any Host."""
    names = ["localhost", *([] if _is_ip(host) or is_loopback(host) else [host]), *allowed_hosts]
    host_check_off = not host_check or (not is_loopback(host) and _is_ip(host) and not allowed_hosts)
    tornado = {"allow_remote_access": host_check_off, "local_hostnames": list(dict.fromkeys(names)),
               "websocket_max_message_size": WEBSOCKET_MAX_MESSAGE_BYTES}
    return [f"--Voila.tornado_settings={tornado!r}",
            "--Voila.auto_token=True" if token else "--Voila.token=",
            "--VoilaConfiguration.multi_kernel_manager_class=toolkit.ui.kernel_cap.CappedKernelManager",
            f"--CappedKernelManager.max_kernels={max_kernels}",
            f"--MappingKernelManager.cull_idle_timeout={KERNEL_IDLE_S}",
            f"--MappingKernelManager.cull_interval={CULL_INTERVAL_S}"]


def voila_env(base: dict[str, str], token: str) -> dict[str, str]:
    """The environment for Voilà: $JUPYTER_TOKEN set to the token (or removed with no token)."""
    env = dict(base)
    env.pop("JUPYTER_TOKEN_FILE", None)
    if token:
        env["JUPYTER_TOKEN"] = token
    else:
        env.pop("JUPYTER_TOKEN", None)
    return env


def with_token(url: str, token: str) -> str:
    """The URL with `?token=...` when there is a token."""
    return f"{url}?token={token}" if token else url


def _shown(host: str) -> str:
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class _Terminated(Exception):
    pass


def _on_term(signum, frame):
    raise _Terminated


def _max_kernels(value: int) -> int:
    if value < 1:
        raise ToolkitError(f"--max-kernels {value}: must be 1 or more")
    return value


def serve_dashboards(settings, host: str = "127.0.0.1", port: int = 8866, *, token: str | bool = True,
                     timeout: float = 120, out: Out = _print, allowed_hosts: Sequence[str] = (),
                     max_kernels: int = MAX_KERNELS) -> int:
    """Serve every classifier's dashboard, the index and the cleaning app from apps/ with Voilà
    until Ctrl-C or SIGTERM; prints the URLs (with the token). Returns the exit code."""
    from toolkit.ui.apps import CLEAN_APP, write_apps
    from toolkit.ui.voila import WITH_API, launch_voila, preheat_args, stop_voila

    token = _token(token)
    warning = check_bind(host, token, allowed_hosts)
    max_kernels = _max_kernels(max_kernels)
    write_apps(settings)
    apps = settings.root / "apps"
    preheated = [name for name, spec in settings.classifiers.items() if spec.preheat]
    extra = preheat_args(preheated, [n for n in settings.classifiers if n not in preheated] + ["index", "clean"])
    extra += voila_security_args(host, allowed_hosts, token=token, max_kernels=max_kernels)
    env = voila_env(dict(os.environ, TOOLKIT_SETTINGS=str(settings.path)), token)
    log = apps / f".voila-{port}.log"
    out(f"starting Voila on {apps} (log: {log}) ...")
    previous = signal.signal(signal.SIGTERM, _on_term)
    proc = None
    try:  # from here on, Ctrl-C or SIGTERM at any moment stops Voila and its kernels too
        proc = launch_voila(apps, port, host, env, log_path=log, extra_args=extra, cwd=settings.root,
                            timeout=timeout, module=WITH_API)
        base = f"http://{_shown(host)}:{port}"
        out(f"serving {len(settings.classifiers)} dashboard(s); open:")
        out(f"  {'index':<12} {with_token(f'{base}/voila/render/index.ipynb', token)}")
        for name, spec in settings.classifiers.items():
            state = "" if (spec.models_dir / "model.json").is_file() else f"  (no model yet: toolkit train {name})"
            out(f"  {name:<12} {with_token(f'{base}/voila/render/{name}.ipynb', token)}{state}")
        clean_state = "" if (apps / CLEAN_APP).is_file() else "  (not installed yet)"
        out(f"  {'cleaning':<12} {with_token(f'{base}/voila/render/{CLEAN_APP}', token)}{clean_state}")
        out(f"JSON API: POST an image to {base}/api/predict/NAME"
            + (" with the header 'Authorization: token TOKEN' (the token above)" if token else ""))
        if warning:
            out(warning)
        if not token:
            out("warning: --no-token: any program on this machine can use the dashboards")
        if preheated:
            out(f"preheated kernels: {', '.join(preheated)}")
        out("Ctrl-C stops the server.")
        proc.wait()
    except (KeyboardInterrupt, _Terminated):
        print("stopping Voila ...", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            stop_voila(proc, grace=STOP_GRACE_S)
        signal.signal(signal.SIGTERM, previous)
    return 0 if proc is None or proc.returncode in (0, -15, None) else 1


def serve_cleaner(spec, settings_path: str | Path, data: str | Path | None = None, host: str = "127.0.0.1",
                  port: int = 8866, *, token: str | bool = True, out: Out = _print,
                  allowed_hosts: Sequence[str] = (), timeout: float = 120) -> int:
    """Serve the cleaning app of one classifier (apps/clean.ipynb) with Voilà until Ctrl-C
    (KeyboardInterrupt goes on to the caller) or SIGTERM (returns 0); prints the URL with the token."""
    from toolkit.ui.clean_notebook import write_clean_notebook
    from toolkit.ui.voila import launch_voila, stop_voila

    token = _token(token)
    warning = check_bind(host, token, allowed_hosts)
    notebook = spec.root / "apps" / "clean.ipynb"
    if not notebook.is_file():
        write_clean_notebook(notebook)
    env = dict(os.environ, TOOLKIT_CLASSIFIER=spec.name, TOOLKIT_SETTINGS=str(Path(settings_path).resolve()))
    if data:
        env["TOOLKIT_DATA"] = str(Path(data).resolve())
    extra = voila_security_args(host, allowed_hosts, token=token, max_kernels=CLEAN_MAX_KERNELS)
    previous = signal.signal(signal.SIGTERM, _on_term)
    process = None
    try:  # from here on, Ctrl-C or SIGTERM at any moment stops Voila too
        process = launch_voila(notebook, port, host, voila_env(env, token), extra_args=extra, cwd=spec.root,
                               log_path=notebook.parent / f".voila-{port}.log", timeout=timeout)
        out(f"cleaning [{spec.name}] at {with_token(f'http://{_shown(host)}:{port}/', token)} (Ctrl-C to stop)")
        if warning:
            out(warning)
        return process.wait()
    except _Terminated:
        print("stopping Voila ...", file=sys.stderr, flush=True)
        return 0
    finally:
        if process is not None:
            stop_voila(process, grace=STOP_GRACE_S)
        signal.signal(signal.SIGTERM, previous)


def serve_bundle(root: str | Path = ".", environ: dict[str, str] | None = None) -> int:
    """A deployed bundle's start.sh: Voilà with the API on $HOST:$PORT (default 0.0.0.0:8866),
    public unless $TOKEN is set, any Host accepted (a bundle is meant to be reached by its public
    name, behind whatever proxy hosts it). Prints the URLs, then becomes Voilà (exec)."""
    import json

    from toolkit.ui.voila import WITH_API, template_env, voila_command

    env = dict(os.environ if environ is None else environ)
    root = Path(root).resolve()
    host = env.get("HOST") or "0.0.0.0"
    try:
        port = int(env.get("PORT") or 8866)
        if not 0 < port < 65536:
            raise ValueError
        names = json.loads((root / "bundle.json").read_text())["classifiers"]
    except ValueError:
        print(f"error: PORT={env.get('PORT')!r} is not a port number (or bundle.json is broken)", file=sys.stderr)
        return 2
    token = env.get("TOKEN", "")
    base = f"http://{_shown(host)}:{port}"
    _print(f"serving {len(names)} dashboard(s) and the JSON API on {host}:{port}; open:")
    for name in names:
        _print(f"{name}: {with_token(f'{base}/voila/render/{name}.ipynb', token)}")
    _print(f"index: {with_token(f'{base}/voila/render/index.ipynb', token)}")
    _print(f"JSON API: POST an image to {base}/api/predict/NAME"
           + (" with the header 'Authorization: token $TOKEN'" if token else " (public; set TOKEN to guard it)"))
    args = voila_security_args(host, token=token, host_check=False)
    sys.stdout.flush()
    command = voila_command(root / "apps", port, host, args, WITH_API)
    os.chdir(root)
    os.execve(sys.executable, command,
              template_env(voila_env(dict(env, TOOLKIT_SETTINGS=str(root / "settings.ini")), token)))
    return 1  # not reached
