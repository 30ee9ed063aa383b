"""What the demo's inputs (`mvdata_assets.demo`) put in the warehouse, derived from them for the tests."""

from __future__ import annotations

from collections import Counter

from mvdata_assets.demo import DEMO_DATA, DEMO_RUNS


def runs_per_dataset() -> list[tuple[str, int]]:
    """(dataset, how many demo training runs name it in their config's data.datasets), by dataset."""
    return sorted(Counter(name for _, encoder, *_ in DEMO_RUNS.values() for name in DEMO_DATA[encoder]).items())
