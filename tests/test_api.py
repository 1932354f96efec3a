"""The JSON prediction API's parts in-process: what a request body holds, the answer for a real
photo from a real model, the refusals, and the jupyter_server extension entry points."""

from __future__ import annotations

import pytest
from conftest import TINY_CLASSES
from test_dashboard import photo
from tornado.httputil import HTTPHeaders, HTTPServerRequest, parse_body_arguments


def _request(body: bytes, content_type: str = "application/octet-stream") -> HTTPServerRequest:
    request = HTTPServerRequest(method="POST", uri="/api/predict/tiny", headers=HTTPHeaders(
        {"Content-Type": content_type, "Content-Length": str(len(body))}), body=body)
    parse_body_arguments(content_type, body, request.body_arguments, request.files, request.headers)
    return request


def _form(**files: bytes) -> tuple[bytes, str]:
    boundary = "b0undary"
    parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.jpg\"\r\n"
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for name, data in files.items())
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def api(trained_project, monkeypatch):
    from toolkit.ui import api

    monkeypatch.setenv("TOOLKIT_SETTINGS", str(trained_project / "settings.ini"))
    return api


def test_request_images_body_file_and_pairs(api):
    assert api.request_images(_request(b"abc")) == [("body", b"abc")]
    body, kind = _form(file=b"xyz")
    assert api.request_images(_request(body, kind)) == [("file.jpg", b"xyz")]
    body, kind = _form(second=b"2", first=b"1")
    assert api.request_images(_request(body, kind)) == [("first.jpg", b"1"), ("second.jpg", b"2")]
    body, kind = _form(other=b"1")
    with pytest.raises(api.ApiError) as error:
        api.request_images(_request(body, kind))
    assert error.value.status == 400


def test_predict_bytes_answers_and_refuses(api, clothing_small):
    file = photo(clothing_small, "t-shirt")
    answer = api.predict_bytes("tiny", [(file.name, file.read_bytes())])
    assert answer["label"] in TINY_CLASSES and abs(sum(answer["probs"].values()) - 1) < 1e-3 and answer["ms"] > 0
    assert api.predictor_for("tiny") is api.predictor_for("tiny")  # loaded once per name
    for name, images, status in (("tiny", [("a", b"plain text")], 400), ("tiny", [("a", b"")], 400),
                                 ("tiny", [("a", b"1"), ("b", b"2")], 400), ("nope", [("a", b"1")], 404),
                                 ("../tiny", [("a", b"1")], 404), ("tiny/../x", [("a", b"1")], 404)):
        with pytest.raises(api.ApiError) as error:
            api.predict_bytes(name, images)
        assert error.value.status == status, (name, error.value.message)
    big = b"\xff\xd8" + b"0" * (api.API_MAX_BYTES + 1)
    with pytest.raises(api.ApiError, match="limit"):
        api.predict_bytes("tiny", [("big.jpg", big)])


def test_server_extension_entry_points(api):
    assert api._jupyter_server_extension_points() == [{"module": "toolkit.ui.api"}]
    routes = [pattern for pattern, _ in api.api_handlers("/base/")]
    assert routes == ["/base/api/predict/([^/]+)"]
    app = api.voila_app_class()
    assert app.__mro__[1].__name__ == "Voila"
