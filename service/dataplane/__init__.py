"""The data plane: from the engines' KV-cache events to the index, and lookups against it.

Two implementations of one protocol (``protocol.DataPlane``): ``native`` (the C++ data plane,
service._dataplane: its own threads, the GIL released) is what the service runs; ``python``
(the reference: asyncio, the Python index) runs only when the configuration asks for it.
``create_data_plane`` builds the one the settings name.
"""

from service.dataplane.factory import create_data_plane
from service.dataplane.protocol import DataPlane, Lookup

__all__ = ["DataPlane", "Lookup", "create_data_plane"]
