"""Test-wide settings."""

from hypothesis import HealthCheck, settings

# Shared 2-core machines stall now and then; a property must fail on its assertions, not on
# a slow example.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("default")
