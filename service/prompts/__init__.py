"""Text and chat prompts to token ids, as vLLM computes them: per-model tokenizers
(``tokenizer``), sandboxed chat templates (``template``, ``messages``) and a prefix store
(``prefix_store``, ``boundaries``) so long shared prefixes are not tokenised again.

``PromptEncoder`` (one model's) is in ``service.prompts.encoder``, imported on first use."""

from service.prompts.encoders import DEFAULT_PREFIX_STORE_BYTES, PromptEncoders, PromptSpec

__all__ = ["DEFAULT_PREFIX_STORE_BYTES", "PromptEncoders", "PromptSpec"]
