"""What the warehouse must hold, derived from the writer's truth files (what was logged), and the
value rule of the data contract: `value` holds every number (NaN and ±Inf kept), `value_json` holds
the exact JSON text only when a DOUBLE can't hold the value exactly."""

from __future__ import annotations

import json
import math
from typing import Any

EXACT_INT_LIMIT = 2**53
MEDIA = "__media__"
SYSTEM_SUMMARY_KEYS = {"_step", "_runtime", "_timestamp"}


def is_media(leaf: Any) -> bool:
    return isinstance(leaf, dict) and MEDIA in leaf


def flatten(key: str, value: Any) -> list[tuple[str, Any]]:
    """Dicts become dotted keys; media placeholders, lists and empty dicts stay leaves."""
    if isinstance(value, dict) and value and not is_media(value):
        out = []
        for sub_key, sub_value in value.items():
            out += flatten(f"{key}.{sub_key}", sub_value)
        return out
    return [(key, value)]


def flat(values: dict) -> dict[str, Any]:
    return {k: v for key, value in values.items() for k, v in flatten(key, value)}


def steps(truth: dict) -> dict[int, dict[str, Any]]:
    """step -> flattened dict of what was logged at that step (media as placeholders)."""
    return {step: flat(data) for step, data in truth["steps"]}


def _drop_subtree(values: dict[str, Any], key: str) -> None:
    for k in [k for k in values if k == key or k.startswith(key + ".")]:
        del values[k]


def summary(truth: dict) -> dict[str, Any]:
    """Final summary: last logged value of every history key, then the explicit sets and deletes."""
    out: dict[str, Any] = {}
    for _, data in truth["steps"]:
        # the SDK leaves null metrics out of the summary (they are in the history)
        out.update((k, v) for k, v in flat(data).items() if v is not None)
    for key, value in truth["summary_sets"].items():
        _drop_subtree(out, key)
        out.update(flatten(key, value))
    for key in truth["summary_deletes"]:
        _drop_subtree(out, key)
    return out


def config(truth: dict) -> dict[str, Any]:
    return flat(truth["config"])


def rule_error(value: float | None, value_json: str | None, leaf: Any) -> str | None:
    """None when (value, value_json) is how the contract stores `leaf`, else what is wrong."""
    got = f"(value={value!r}, value_json={value_json!r}) for {leaf!r}"
    if isinstance(leaf, bool) or leaf is None:
        if value is not None or value_json is None or json.loads(value_json) != leaf:
            return f"bool/null not kept as JSON: {got}"
        if type(json.loads(value_json)) is not type(leaf):
            return f"wrong JSON type: {got}"
        return None
    if isinstance(leaf, int):
        if value is None or value != float(leaf):
            return f"int not in value: {got}"
        if abs(leaf) <= EXACT_INT_LIMIT:
            return None if value_json is None else f"exact int also in value_json: {got}"
        if value_json is None:
            return f"int beyond 2^53 without exact value_json: {got}"
        parsed = json.loads(value_json)
        if type(parsed) is not int or parsed != leaf:
            return f"value_json not the exact int: {got}"
        return None
    if isinstance(leaf, float):
        if value is None:
            return f"float not in value: {got}"
        if not (value == leaf or (math.isnan(value) and math.isnan(leaf))):
            return f"float differs: {got}"
        return None if value_json is None else f"float also in value_json: {got}"
    if isinstance(leaf, str | list | dict):
        if value is not None or value_json is None:
            return f"non-number not in value_json: {got}"
        if json.loads(value_json) != leaf:
            return f"value_json differs: {got}"
        return None
    return f"unexpected leaf type: {got}"


def media_error(rows: dict[str, tuple], key: str, leaf: dict) -> str | None:
    """Media are stored as flattened keys: key._type, key.path, key.sha256, key.size, ..."""
    need = [f"{key}._type", f"{key}.path", f"{key}.sha256", f"{key}.size"]
    missing = [k for k in need if k not in rows]
    if missing:
        return f"media {key!r}: missing {missing} among {sorted(k for k in rows if k.startswith(key))}"
    _, type_json = rows[f"{key}._type"]
    if type_json is None or json.loads(type_json) != leaf[MEDIA]:
        return f"media {key!r}: _type {type_json!r} != {leaf[MEDIA]!r}"
    path_value, path_json = rows[f"{key}.path"]
    if path_value is not None or not isinstance(json.loads(path_json or "null"), str):
        return f"media {key!r}: path not a string: {path_json!r}"
    size_value, _ = rows[f"{key}.size"]
    if size_value is None or size_value <= 0:
        return f"media {key!r}: size {size_value!r}"
    return None


def compare(rows: dict[str, tuple], expected: dict[str, Any], where: str, skip: set[str] = frozenset()) -> list[str]:
    """Errors comparing stored rows {key: (value, value_json)} with the expected leaves."""
    errors = []
    for key, leaf in expected.items():
        if key in skip:
            continue
        if is_media(leaf):
            err = media_error(rows, key, leaf)
        elif key not in rows:
            err = f"missing key {key!r}"
        else:
            err = rule_error(*rows[key], leaf)
        if err:
            errors.append(f"{where}: {key!r}: {err}")
    return errors


def media_subkeys(rows: dict[str, tuple], expected: dict[str, Any]) -> set[str]:
    prefixes = tuple(f"{k}." for k, v in expected.items() if is_media(v))
    return {k for k in rows if prefixes and k.startswith(prefixes)}


def step_mismatches(got: dict[int, dict[str, tuple]], truth: dict, wanted: list[int], where: str) -> list[str]:
    """Differences between stored rows per step and what the writer logged at those steps.

    `pow53` is compared by its own test (the value rule at exactly 2^53), so it is left out here.
    """
    expected = steps(truth)
    errors = [] if sorted(got) == sorted(wanted) else [f"{where}: steps {sorted(got)[:10]}… != {sorted(wanted)[:10]}…"]
    for step in wanted:
        rows, want = got.get(step, {}), expected[step]
        errors += compare(rows, want, f"{where} step {step}", skip={"pow53"})
        extra = set(rows) - set(want) - media_subkeys(rows, want)
        if extra:
            errors.append(f"{where} step {step}: keys never logged: {sorted(extra)}")
    return errors
