"""HTML and image helpers shared by every dashboard (the classifier's, the pairs', the cleaning app's):
one-line error messages, the page header, probability bars, thumbnails. Pure functions, no widgets.
"""

from __future__ import annotations

import html
import io

from PIL import Image

from toolkit.core.errors import ToolkitError

TOP_K = 5  # labels shown per prediction
THUMB = 192  # thumbnail long side in pixels
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # per uploaded file; bigger uploads get a one-line message


def image_bytes(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, quality=90) if fmt == "JPEG" else img.save(buffer, format=fmt)
    return buffer.getvalue()


def thumbnail(img: Image.Image, side: int = THUMB) -> tuple[bytes, int, int]:
    """JPEG bytes of `img` fitted in side x side with its aspect kept (a small image, such as a
    28 px Fashion-MNIST photo, enlarged by a whole factor with sharp pixels), and its width and height."""
    factor = side // max(img.size)
    fitted = img.resize((img.width * factor, img.height * factor), Image.NEAREST) if factor >= 2 else shrunk(img, side)
    return image_bytes(fitted.convert("RGB")), fitted.width, fitted.height


def show_thumbnail(widget, img: Image.Image | None, side: int = THUMB) -> None:
    """Set an ipywidgets Image to `img`'s thumbnail at its own size (never stretched by its row),
    or hide it for None (no broken-image icon before an upload)."""
    if img is None:
        widget.value, widget.layout.display = b"", "none"
        return
    widget.value, width, height = thumbnail(img, side)
    widget.layout.width, widget.layout.height = f"{width}px", f"{height}px"
    widget.layout.object_fit, widget.layout.align_self, widget.layout.flex = "contain", "flex-start", "0 0 auto"
    widget.layout.display = None


def shrunk(img: Image.Image, side: int) -> Image.Image:
    if max(img.size) <= side:
        return img
    copy = img.copy()
    copy.thumbnail((side, side), Image.BILINEAR)
    return copy


def one_line(exc: BaseException) -> str:
    if isinstance(exc, ToolkitError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def error_html(message: str) -> str:
    return f'<div class="toolkit-error" style="color:#b00020">&#9888; {html.escape(message)}</div>'


def header_html(spec) -> str:
    """The page's title and description from settings.ini."""
    description = spec.description or ""
    return (f"<h2 class='toolkit-title'>{html.escape(spec.display_title)}</h2>"
            + (f"<p class='toolkit-description'>{html.escape(description)}</p>" if description else ""))


def probability_bars(probs: dict[str, float], k: int = TOP_K) -> str:
    """The top-k labels with percentage and a bar, as HTML (stable classes for tests)."""
    rows = []
    for rank, (label, p) in enumerate(sorted(probs.items(), key=lambda kv: -kv[1])[:k]):
        weight = "bold" if rank == 0 else "normal"
        rows.append(
            f'<div class="toolkit-pred" style="display:flex;align-items:center;gap:6px;margin:2px 0">'
            f'<span class="toolkit-label" style="width:11em;font-weight:{weight}">{html.escape(label)}</span>'
            f'<span style="display:inline-block;width:160px;height:12px;background:#eee">'
            f'<span style="display:block;width:{p * 100:.1f}%;height:12px;background:#3b7dd8"></span></span>'
            f'<span class="toolkit-prob">{p:.1%}</span></div>'
        )
    return '<div class="toolkit-preds">' + "".join(rows) + "</div>"
