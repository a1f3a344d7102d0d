"""vLLM KV-cache events: wire decoding and the domain events the index consumes."""
