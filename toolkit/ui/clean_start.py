"""The cleaning notebook's first and only call: paint at once, import and rank in the background.

Importing the toolkit (torch, fastai, the task registry) takes seconds; this module imports only
ipywidgets, shows a progress bar, and builds `CleanerWidget` in a thread, which ranks in its own
background thread (see toolkit.ui.clean_app). ipywidgets updates from threads reach the page while
the kernel runs, so Voilà shows the page as soon as the cell returns.

In a preheated kernel (Voilà's `preheat_kernel`: the notebook has run before any page asks for it,
so the page is served at once) the thread first waits for the page's request (`voila.utils.
wait_for_request`): a kernel waiting in the pool holds only ipywidgets, and ranks only for a page.
Then (in any kernel) it waits until the page has fetched the widgets' state, at most
FIRST_STATES_WAIT_S: the imports hold the GIL for seconds and would slow the kernel's answers to the
page (TOOLKIT_CLEAN_WAIT_PAGE=0 turns that wait off, for bench/clean_app.py's baseline)."""

from __future__ import annotations

import html
import os
import threading
import traceback
from pathlib import Path

import ipywidgets as W

FIRST_STATES_WAIT_S = 8.0  # at most this long for a page to fetch the shell before the heavy imports


def _first_states_sent() -> threading.Event:
    """An event set once a page's widget manager has fetched the widgets' state (`request_states` on
    ipywidgets' control comm, answered by ipywidgets itself): from then on the page can draw the shell.
    Set at once outside a kernel. The heavy imports wait for it (bounded by FIRST_STATES_WAIT_S),
    so they do not hold the GIL while the kernel should be answering the page."""
    done = threading.Event()
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or not hasattr(shell, "kernel"):
            done.set()
            return done
        from ipywidgets import comm

        manager = comm.get_comm_manager()

        def answered(msg) -> None:
            try:
                W.Widget._handle_control_comm_msg(msg)
            finally:
                done.set()

        def opened(channel, msg) -> None:
            W.Widget.handle_control_comm_opened(channel, msg)
            channel.on_msg(answered)  # in place of ipywidgets' own handler, which it calls

        manager.register_target("jupyter.widget.control", opened)
    except Exception:  # noqa: BLE001 - never keep the app from starting
        done.set()
    return done


def _wait_for_page() -> None:
    """Block until Voilà hands this preheated kernel to a page (returns at once if that cannot be
    known: the app then ranks without waiting, as an unheated kernel does)."""
    try:
        from voila.utils import wait_for_request

        wait_for_request()
    except Exception:  # noqa: BLE001 - never keep the app from starting
        pass


def start_cleaner(classifier: str | None = None, settings: str | Path | None = None, data: str | Path | None = None,
                  **kwargs) -> W.VBox:
    """Show the cleaning app for `classifier` (default: $TOOLKIT_CLASSIFIER, else the first section)."""
    from IPython.display import display

    text = W.HTML("<span class='clean-progress-text'>0% loading the toolkit</span>")
    shell = W.VBox([W.HTML("<h2>Clean</h2>"), W.HBox([W.FloatProgress(value=0.0, min=0.0, max=1.0,
                                                                       layout=W.Layout(width="420px")), text])])
    shell.children[1].add_class("clean-progress")
    shell.add_class("clean-shell")

    drawn = _first_states_sent() if os.environ.get("TOOLKIT_CLEAN_WAIT_PAGE", "1") != "0" else None

    def build() -> None:
        try:
            if os.environ.get("VOILA_PREHEAT") == "True":  # in Voilà's pool: wait for a page to use it
                _wait_for_page()
            if drawn is not None:
                drawn.wait(FIRST_STATES_WAIT_S)
            from toolkit.settings import load_settings
            from toolkit.ui.clean_app import CleanerWidget

            found = load_settings(settings or os.environ.get("TOOLKIT_SETTINGS") or Path.cwd().parent / "settings.ini")
            name = classifier or os.environ.get("TOOLKIT_CLASSIFIER") or next(iter(found.classifiers))
            shell.children = [CleanerWidget(found.get(name), data=data or os.environ.get("TOOLKIT_DATA") or None,
                                            **kwargs)]
        except Exception as exc:  # noqa: BLE001 - shown, a thread's exception is lost otherwise
            shell.children = [W.HTML(f"<pre class='clean-error-text'>error: {html.escape(str(exc))}\n"
                                     f"{html.escape(traceback.format_exc(limit=4))}</pre>")]

    display(shell)
    threading.Thread(target=build, name="clean-start", daemon=True).start()
    return shell
