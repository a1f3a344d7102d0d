"""Per-model state: key mode, keys, block size, hash self-check results."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from service.index.keys import HashCheck, make_keyer
from service.index.translate import EventTranslator

__all__ = ["ModelKeying", "ModelRegistry", "ModelSpec"]


class ModelSpec(Protocol):
    """The configured settings of one model (``models[]`` in the configuration)."""

    @property
    def name(self) -> str: ...
    @property
    def key_mode(self) -> str: ...
    @property
    def hash_algorithm(self) -> str: ...
    @property
    def hash_seed(self) -> str | None: ...


@dataclass(slots=True)
class ModelKeying:
    """One model's translator and what its hash self-check has seen so far."""

    name: str
    translator: EventTranslator
    configured: bool
    hash_matches: int = 0
    hash_mismatches: int = 0

    def record(self, checks: dict[HashCheck, int]) -> int:
        """Adds a batch's self-check outcomes; returns its mismatches."""
        self.hash_matches += checks.get(HashCheck.MATCH, 0)
        mismatches = checks.get(HashCheck.MISMATCH, 0)
        self.hash_mismatches += mismatches
        return mismatches


class ModelRegistry:
    """Configured models, plus any model first seen in events (which gets the defaults)."""

    def __init__(self, specs: Iterable[ModelSpec] = (), *, max_engine_hashes: int) -> None:
        self._max_engine_hashes = max_engine_hashes
        self._models: dict[str, ModelKeying] = {}
        for spec in specs:
            keyer = make_keyer(spec.key_mode, spec.hash_algorithm, spec.hash_seed)
            self._models[spec.name] = ModelKeying(
                spec.name,
                EventTranslator(keyer, max_engine_hashes=max_engine_hashes),
                configured=True,
            )

    def get(self, name: str) -> ModelKeying | None:
        return self._models.get(name)

    def get_or_add(self, name: str) -> ModelKeying:
        model = self._models.get(name)
        if model is None:
            translator = EventTranslator(
                make_keyer("tokens"), max_engine_hashes=self._max_engine_hashes
            )
            model = self._models[name] = ModelKeying(name, translator, configured=False)
        return model

    def all(self) -> list[ModelKeying]:
        return list(self._models.values())
