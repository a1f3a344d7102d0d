"""Helpers shared by the tests and the load tools: wire encoders, fixtures."""
