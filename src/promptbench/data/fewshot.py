"""Few-shot sampling identical to the reference implementation (protocol.md section 2).

The reference (Dassl's `generate_fewshot_dataset`) groups items by label in order of first appearance,
keeps list order inside a group, and draws `random.sample(group, K)` from Python's global `random`
stream, seeded with the run seed; groups smaller than K are kept whole. The val set is drawn right
after the train set, from the same stream, with min(K, 4) shots.
"""

from __future__ import annotations

import random
from typing import Sequence

from promptbench.data.items import Item
from promptbench.errors import PromptbenchError

VAL_SHOTS_CAP = 4
ALL_SHOTS = -1


def group_by_label(items: Sequence[Item]) -> dict[int, list[Item]]:
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    return groups


def sample_fewshot(items: Sequence[Item], shots: int, rng: random.Random | None = None) -> list[Item]:
    """K items per class as the reference draws them; shots=-1 keeps everything."""
    if shots == ALL_SHOTS:
        return list(items)
    if shots < 0:
        raise PromptbenchError(f"shots must be >= 0, or {ALL_SHOTS} for all training images; got shots={shots}")
    rng = rng or random  # the module-level stream, as the reference uses it
    sampled: list[Item] = []
    for group in group_by_label(items).values():
        sampled.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return sampled


def val_shots(shots: int) -> int:
    return shots if shots == ALL_SHOTS else min(shots, VAL_SHOTS_CAP)
