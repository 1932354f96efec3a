"""The JSON prediction API, in the same server as the dashboards: `POST /api/predict/NAME`.

    curl --data-binary @shoe.jpg http://HOST:PORT/api/predict/NAME            (the image as the body)
    curl -F file=@shoe.jpg http://HOST:PORT/api/predict/NAME                  (multipart field `file`)
    curl -F first=@a.jpg -F second=@b.jpg http://HOST:PORT/api/predict/PAIRS  (a kind that takes two)
    -> 200 {"label": ..., "probs": {...}, "probability": ..., "ms": ...}  (hierarchical adds "path")
       400 {"error": ...} for an empty, non-image or too large (> API_MAX_BYTES) body
       404 {"error": ...} for a NAME that is not a classifier of settings.ini (or has no model)
       403 / 401 without the token where the server has one, or with a Host it does not allow

It is a jupyter_server extension (`_load_jupyter_server_extension`: `jupyter server
--ServerApp.jpserver_extensions="{'toolkit.ui.api': True}"` loads it). Voilà 0.5's standalone app
is no jupyter_server ServerApp and loads no server extensions (measured: `--ServerApp.jpserver_extensions`
is ignored by `voila`), so `toolkit serve` and the bundle's start.sh run `python -m toolkit.ui.api`:
Voilà's own app (`ToolkitVoila`) with these handlers added before its own. The handlers are
jupyter_server `JupyterHandler`s behind `tornado.web.authenticated`, so the token (Voilà's
identity provider) and the Host check (`local_hostnames` / `allow_remote_access`) guard them exactly
as they guard the dashboards. Names are checked against settings.ini before any path is built;
predictors are loaded once per name (`toolkit.tasks.cached_predictor`) and run one at a time on a
worker thread, so the server keeps answering while a prediction runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tornado import web

from toolkit.core.errors import ToolkitError

API_MAX_BYTES = 10 * 1024 * 1024  # per request body; more is a 400
API_PATH = r"/api/predict/([^/]+)"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
PAIR_FIELDS = ("first", "second")
THREADS_ENV = "TOOLKIT_THREADS"

_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="toolkit-api")
_SETTINGS: dict[str, Any] = {}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _settings():
    """settings.ini ($TOOLKIT_SETTINGS, else ./settings.ini), read again when the file changes."""
    from toolkit.core.project import find_settings
    from toolkit.settings import load_settings

    path = Path(find_settings()).resolve()
    key = (str(path), path.stat().st_mtime_ns if path.is_file() else 0)
    if _SETTINGS.get("key") != key:
        _SETTINGS.update(key=key, settings=load_settings(path))
    return _SETTINGS["settings"]


def model_folder(spec) -> Path:
    """The folder to predict with: models/NAME/, or its first trained sub-model (pairs' approaches)."""
    from toolkit.core.artifacts import META_FILE

    folder = spec.models_dir
    if (folder / META_FILE).is_file():
        return folder
    subs = sorted(p for p in folder.glob("*/") if (p / META_FILE).is_file()) if folder.is_dir() else []
    if not subs:
        raise ApiError(404, f"{spec.name} has no trained model yet")
    return subs[0]


def classifier(name: str) -> Any:
    """The ClassifierSpec of NAME, or a 404 when settings.ini has no such classifier."""
    if not NAME_RE.fullmatch(name):
        raise ApiError(404, "unknown classifier name")
    settings = _settings()
    if name not in settings.classifiers:
        raise ApiError(404, f"unknown classifier {name!r}; known: {', '.join(settings.classifiers) or 'none'}")
    return settings.classifiers[name]


def predictor_for(name: str) -> Any:
    """The cached predictor of classifier NAME (checked against settings.ini first)."""
    from toolkit.tasks import cached_predictor

    spec = classifier(name)
    try:
        return cached_predictor(model_folder(spec))
    except ToolkitError as exc:
        raise ApiError(404, str(exc).splitlines()[0]) from None


def _as_json(prediction: Any) -> dict[str, Any]:
    answer = prediction.as_dict()
    if "probs" not in answer and "probability_same" in answer:  # a pair: both outcomes
        p = float(answer["probability_same"])
        answer["probs"] = {"same pair": round(p, 5), "different pairs": round(1 - p, 5)}
    return answer


def predict_bytes(name: str, images: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Predict one request's images (as many as the kind takes) -> the JSON answer."""
    from toolkit.core.images import ImageError, open_image

    predictor = predictor_for(name)
    need = int(getattr(predictor, "n_inputs", 1))
    if len(images) != need:
        fields = "`file` (or the body)" if need == 1 else ", ".join(f"`{f}`" for f in PAIR_FIELDS[:need])
        raise ApiError(400, f"{name} takes {need} image(s): send {fields}")
    started = time.perf_counter()
    try:
        opened = [open_image(data, name=label, max_bytes=API_MAX_BYTES, draft_size=predictor.size)
                  for label, data in images]
        prediction = predictor.predict_sources(opened, names=[label for label, _ in images])
    except ImageError as exc:
        raise ApiError(400, str(exc).splitlines()[0]) from None
    answer = _as_json(prediction)
    answer["ms"] = round((time.perf_counter() - started) * 1000, 2)
    return answer


def _threads() -> None:
    try:
        import torch

        torch.set_num_threads(max(1, int(os.environ.get(THREADS_ENV) or 1)))
    except ValueError:
        pass


def request_images(request) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in a tornado request: multipart `file` or `first`+`second`,
    else the raw body."""
    if request.files:
        for fields in (("file",), PAIR_FIELDS):
            if all(f in request.files for f in fields):
                return [(request.files[f][0].filename or f, request.files[f][0].body) for f in fields]
        raise ApiError(400, "multipart form without a `file` field (or `first` and `second` for pairs)")
    if request.headers.get("Content-Type", "").startswith("multipart/"):
        raise ApiError(400, "the form holds no image file")
    return [("body", request.body)]  # any other type (curl --data-binary sends a form type)


def _handler_base():
    from jupyter_server.base.handlers import JupyterHandler

    return JupyterHandler


class PredictHandler(_handler_base()):  # type: ignore[misc]
    """POST /api/predict/NAME: behind the server's token and Host check (tornado's authenticated)."""

    def check_xsrf_cookie(self) -> None:
        """A JSON API for programs: no XSRF form cookie (a request carries the token, or the server
        is public; a prediction changes nothing on the server)."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason or "error"
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            reason = exc.log_message
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": reason}))

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))

    @web.authenticated
    async def post(self, name: str) -> None:
        try:
            classifier(name)
            length = int(self.request.headers.get("Content-Length") or len(self.request.body))
            if length > API_MAX_BYTES + 64 * 1024:
                raise ApiError(400, f"{length} bytes is over the {API_MAX_BYTES} byte limit")
            images = request_images(self.request)
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(_EXECUTOR, predict_bytes, name, images)
        except ApiError as exc:
            self._answer(exc.status, {"error": exc.message})
            return
        except Exception as exc:  # never a traceback page; one line
            self.log.exception("prediction failed")
            self._answer(500, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
            return
        self._answer(200, answer)

    @web.authenticated
    def get(self, name: str) -> None:
        self._answer(405, {"error": "POST an image to this URL"})


def api_handlers(base_url: str = "/") -> list[tuple[str, type]]:
    from jupyter_server.utils import url_path_join

    return [(url_path_join(base_url, API_PATH), PredictHandler)]


# ------------------------------------------------------------ as a jupyter_server extension


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "toolkit.ui.api"}]


def _load_jupyter_server_extension(serverapp) -> None:
    _threads()
    serverapp.web_app.add_handlers(".*$", api_handlers(serverapp.web_app.settings.get("base_url", "/")))


# ------------------------------------------------------------ in Voilà's own app


def voila_app_class():
    """Voilà's app with the API's handlers ahead of its own (its catch-all routes come last)."""
    from voila.app import Voila

    class ToolkitVoila(Voila):
        def init_handlers(self) -> list:
            return [*api_handlers(self.server_url or self.base_url), *super().init_handlers()]

    return ToolkitVoila


def main() -> None:
    """`python -m toolkit.ui.api ARGS`: Voilà (same options) serving the API too."""
    _threads()
    voila_app_class().launch_instance()


if __name__ == "__main__":
    main()
