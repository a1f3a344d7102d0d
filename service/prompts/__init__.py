"""Text and chat prompts to token ids, as vLLM computes them: per-model tokenizers
(``tokenizer``), sandboxed chat templates (``template``, ``messages``) and a prefix store
(``prefix_store``, ``boundaries``) so long shared prefixes are not tokenised again."""

from service.prompts.encoders import (
    DEFAULT_PREFIX_STORE_BYTES,
    PromptEncoder,
    PromptEncoders,
    PromptSpec,
)

__all__ = ["DEFAULT_PREFIX_STORE_BYTES", "PromptEncoder", "PromptEncoders", "PromptSpec"]
