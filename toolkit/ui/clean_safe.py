"""One decorator for the cleaning app's callbacks: an exception is shown in the app's error box
(Voilà would swallow it) instead of being lost."""

from __future__ import annotations

import html
import traceback
from functools import wraps


def _safe(method):
    """Run a callback; show any exception in the widget's error box instead of losing it."""

    @wraps(method)
    def wrapper(self, *args, **kwargs):
        box = self.error if hasattr(self, "error") else self.owner.error
        try:
            box.value = ""
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            box.value = (f"<pre class='clean-error-text'>error: {html.escape(str(exc))}\n"
                                f"{html.escape(traceback.format_exc(limit=4))}</pre>")
            return None

    return wrapper
