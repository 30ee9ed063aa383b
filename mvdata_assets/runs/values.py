"""How W&B values (JSON text) become the (value DOUBLE, value_json VARCHAR) pair of the warehouse.

The rule, shared with the C scanner for history: `value` holds every number (NaN and ±Inf included);
`value_json` holds the exact JSON text whenever a DOUBLE can't hold the value exactly (strings,
booleans, null, lists, objects, integers beyond 2^53).
"""

from __future__ import annotations

import json
import math
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


def flatten(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    """Nested dicts become dotted keys (`optimizer.lr`); lists and empty dicts stay whole."""
    if isinstance(value, dict) and value:
        for sub_key, sub_value in value.items():
            yield from flatten(f"{key}.{sub_key}", sub_value)
    else:
        yield key, value


def flat_rows(key: str, value_json: str) -> Iterator[tuple[str, float | None, str | None]]:
    """(key, value, value_json) rows for one W&B item, dicts flattened."""
    for flat_key, leaf in flatten(key, parse_json(value_json)):
        yield (flat_key, *split_value(leaf))


def finite_or_none(number: float | None) -> float | None:
    return number if number is not None and math.isfinite(number) else None
