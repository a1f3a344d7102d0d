"""Test-wide settings and fixtures."""

from typing import cast

import pytest
from hypothesis import HealthCheck, settings

from service.dataplane.protocol import DataPlaneKind
from tests.support.planes import PLANES

# Shared 2-core machines stall now and then; a property must fail on its assertions, not on
# a slow example.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("default")


@pytest.fixture(params=PLANES)
def kind(request: pytest.FixtureRequest) -> DataPlaneKind:
    """The data plane a test runs against: a test taking it is proven for both."""
    return cast(DataPlaneKind, request.param)
