"""A small name -> factory registry, so that config blocks of the form ``{name, params}`` build objects.

Every configurable component chosen by name (architecture, loss, optimiser, scheduler, sampler, augmentation,
post-processing strategy, search grid, demo layout, a request's content type) comes from a registry instead of an
if/else chain, and one builder turns any config block into an object. (TTA is no registry: its config section is a
plain ``{hflip, vflip, scales}``, see :class:`pneumoseg.inference.tta.TTA`.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar, cast

from omegaconf import DictConfig, OmegaConf

from pneumoseg.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Factories of one kind of component, looked up by name.

    Args:
        kind: what the registry holds, used in error messages ("loss", "optimizer", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator adding a factory under ``name`` (default: the factory's ``__name__``)."""

        def add(factory: Callable[..., T]) -> Callable[..., T]:
            key = name or factory.__name__
            if key in self._factories:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._factories[key] = factory
            return factory

        return add

    def add(self, name: str, factory: Callable[..., T]) -> None:
        """Register an existing callable (a library class, say) under ``name``."""
        self.register(name)(factory)

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories))
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._factories)

    def build(self, block: Mapping[str, Any] | None, **extra: Any) -> T:
        """Build from a ``{name, params}`` block; ``extra`` keyword arguments (a model's parameters, say)
        are passed alongside ``params``."""
        if isinstance(block, DictConfig):
            block = cast(dict, OmegaConf.to_container(block, resolve=True))
        if block is None or "name" not in block:
            raise ConfigError(f"a {self.kind} block needs a 'name' (one of: {', '.join(self.names())})")
        params = dict(block.get("params") or {})
        factory = self.get(block["name"])
        try:
            return factory(**extra, **params)
        except TypeError as exc:
            raise ConfigError(f"{self.kind} {block['name']!r}: bad params {params}: {exc}") from None
