"""How W&B values (JSON text) become the (value DOUBLE, value_json VARCHAR) pair of the warehouse.

The rule, shared with the C scanner for history: `value` holds every number (NaN and ±Inf included);
`value_json` holds the exact JSON text whenever a DOUBLE can't hold the value exactly (strings,
booleans, null, lists, objects, integers beyond 2^53).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

EXACT_INT_LIMIT = 2**53


def parse_json(text: str) -> Any:
    """Parses W&B's JSON (which writes NaN, Infinity, -Infinity bare); ints stay exact."""
    return json.loads(text)


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=True, separators=(",", ":"))


def split_value(leaf: Any) -> tuple[float | None, str | None]:
    if isinstance(leaf, bool) or leaf is None:
        return None, to_json(leaf)
    if isinstance(leaf, int):
        try:
            as_double = float(leaf)
        except OverflowError:
            return None, str(leaf)
        return as_double, (None if abs(leaf) <= EXACT_INT_LIMIT else str(leaf))
    if isinstance(leaf, float):
        return leaf, None
    return None, to_json(leaf)


def leaf_paths(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Nested dicts become key paths (`optimizer`, `lr`); lists and empty dicts stay whole."""
    if isinstance(value, dict) and value:
        for key, sub_value in value.items():
            yield from leaf_paths(sub_value, (*path, str(key)))
    else:
        yield path, value


def flat_rows(key: str, value_json: str) -> Iterator[tuple[str, float | None, str | None]]:
    """(dotted key, value, value_json) rows for one W&B item, dicts flattened."""
    for path, leaf in leaf_paths(parse_json(value_json), (key,)):
        yield (".".join(path), *split_value(leaf))


def finite_or_none(number: float | None) -> float | None:
    return number if number is not None and math.isfinite(number) else None


KeyPath = tuple[str, ...]


class NestedState:
    """Config or summary as W&B builds it from ordered updates, kept as leaves keyed by key path.

    Setting a key replaces everything below it (`summary["eval"] = {...}` drops the `eval.*` leaves
    logged before) and a scalar that stood at a parent path; removing a key drops its subtree.
    Leaves keep the JSON text they were given, so huge ints stay exact.
    """

    def __init__(self, leaves: dict[KeyPath, str] | None = None) -> None:
        self.leaves: dict[KeyPath, str] = {}
        self._below: Counter[KeyPath] = Counter()  # path -> how many leaves lie strictly below it
        for path, text in (leaves or {}).items():
            self._add(path, text)

    def _add(self, path: KeyPath, text: str) -> None:
        self.leaves[path] = text
        for depth in range(1, len(path)):
            self._below[path[:depth]] += 1

    def _drop(self, path: KeyPath) -> None:
        if self.leaves.pop(path, None) is not None:
            for depth in range(1, len(path)):
                self._below[path[:depth]] -= 1
                if not self._below[path[:depth]]:
                    del self._below[path[:depth]]

    def apply(self, path: KeyPath, value_json: str | None) -> None:
        if path in self._below:
            for leaf in [leaf for leaf in self.leaves if leaf[: len(path)] == path]:
                self._drop(leaf)
        self._drop(path)
        for depth in range(1, len(path)):
            self._drop(path[:depth])
        if value_json is None:
            return
        value = parse_json(value_json)
        if isinstance(value, dict) and value:
            for leaf_path, leaf in leaf_paths(value, path):
                self._add(leaf_path, to_json(leaf))
        else:
            self._add(path, value_json)

    def rows(self) -> list[tuple[str, float | None, str | None]]:
        return [(".".join(path), *split_value(parse_json(text))) for path, text in self.leaves.items()]

    def to_json(self) -> str:
        return to_json([[list(path), text] for path, text in self.leaves.items()])

    @classmethod
    def from_json(cls, text: str | None) -> NestedState:
        return cls({tuple(path): leaf for path, leaf in json.loads(text)} if text else None)
