"""Block keys, the index protocol and its backends."""
