"""A cap on live kernels for Voilà: `--VoilaConfiguration.multi_kernel_manager_class=` this class.

Every page Voilà renders starts a kernel (about 1 GB with fastai) and Voilà does not free it when
the page closes, so without a cap a few reloads fill the machine's memory. `max_kernels` (set by
`toolkit serve`, see `toolkit.ui.serve.MAX_KERNELS`) bounds the kernels alive or starting at once;
one more page gets HTTP 503 with a one-line reason. Kernels of closed pages are culled by
jupyter_server's own culler (`MappingKernelManager.cull_idle_timeout`, set by the same command).
"""

from __future__ import annotations

from typing import Any

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado.web import HTTPError
from traitlets import Integer


class CappedKernelManager(AsyncMappingKernelManager):
    """AsyncMappingKernelManager that refuses to start more than `max_kernels` kernels."""

    max_kernels = Integer(8, config=True, help="Kernels alive or starting at once; one more page gets HTTP 503.")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._starting = 0

    async def start_kernel(self, *, kernel_id: str | None = None, path: str | None = None, **kwargs: Any) -> str:
        if kernel_id is not None and kernel_id in self:
            return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        live = len(self.list_kernel_ids())
        if live + self._starting >= self.max_kernels:
            self.log.warning("refused a kernel: %d alive, %d starting, max_kernels = %d",
                             live, self._starting, self.max_kernels)
            raise HTTPError(503, f"this server already runs {self.max_kernels} dashboard kernels, its limit",
                            reason=f"Too many pages open (limit {self.max_kernels}): close one, its kernel is "
                                   "freed within minutes, and try again")
        self._starting += 1
        try:
            return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        finally:
            self._starting -= 1
