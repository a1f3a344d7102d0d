"""One answer to "can the service answer?", for ``/readyz`` and gRPC health alike."""

from __future__ import annotations

from service.dataplane.protocol import DataPlane
from service.status import ModelStatus, PodStatus, Readiness

__all__ = ["PYTHON_PLANE_WARNING", "ServiceStatus"]

PYTHON_PLANE_WARNING = (
    "data_plane is 'python': the reference data plane, several times slower than the native"
    " one; set data_plane: native (the default) in production"
)


class ServiceStatus:
    """Readiness from the service's lifecycle and its data plane; ``/v1/pods`` and
    ``/v1/models`` from the data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self.started = False
        self.stopping = False

    async def pods(self) -> list[PodStatus]:
        return await self._plane.pods()

    async def models(self) -> list[ModelStatus]:
        return await self._plane.models()

    async def readiness(self) -> Readiness:
        warnings = tuple(self._plane.warnings())
        if self._plane.kind == "python":
            warnings += (PYTHON_PLANE_WARNING,)
        if self.stopping:
            return Readiness(False, ("stopping",), warnings)
        if self._plane.failure is not None:
            return Readiness(False, (self._plane.failure,), warnings)
        if not self.started:
            return Readiness(False, ("starting",), warnings)
        return Readiness(True, (), warnings)
