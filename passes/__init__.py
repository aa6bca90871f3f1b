"""Pruning methods, one file each, written against the channel-group IR (``fxprune.ir``).

A *criterion* is a function ``score(graph, data=None, seed=0, **options)`` returning
``{group name: importance tensor of the group's size}`` (higher is more important).
:data:`REGISTRY` maps the names that ``fxprune.compile(method=...)`` and the CLI take
to criteria.

Example::

    >>> from fxprune import passes
    >>> sorted(passes.REGISTRY)
    ['bn', 'catro', 'curl', 'dwgl', 'gsm', 'l1', 'l2', 'oicsr', 'random', 'taylor']
"""
from __future__ import annotations

from fxprune.errors import ConfigError

from . import bn_scale, catro, curl, dwgl, gsm, magnitude, oicsr, rand, taylor

REGISTRY = {
    "l1": magnitude.l1,
    "l2": magnitude.l2,
    "bn": bn_scale.score,
    "taylor": taylor.score,
    "random": rand.score,
    "curl": curl.score,
    "catro": catro.score,
    "dwgl": dwgl.score,
    "oicsr": oicsr.score,
    "gsm": gsm.score,
}


def get(name: str):
    """The criterion registered as ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}': choose one of {', '.join(sorted(REGISTRY))}") from None


def register(name: str, criterion) -> None:
    """Add a criterion under ``name`` (it then works in ``compile(method=name)`` and the CLI)."""
    REGISTRY[name] = criterion
