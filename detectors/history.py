"""What is new for an API key or account: first sightings judged against its fitted or in-frame history."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from detectors.features import entity_codes
from pipeline.schema import EntityKind

_NEVER = np.iinfo(np.int64).max
_SEP = "\x1f"  # joins entity and item into one label; never appears in keys, accounts or countries


def credentials(events: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code per row, label per code, kind per code) of the credential each event used.

    The API key when the event names one (it is what authenticated), else the account (SMTP AUTH,
    formats without keys); -1 when neither. Keys and accounts get separate codes, so a key and an
    account that happen to share a name stay two entities.
    """
    key_codes, keys = entity_codes(events["api_key_id"])
    account_codes, accounts = entity_codes(events["account"])
    codes = np.where(key_codes >= 0, key_codes, np.where(account_codes >= 0, len(keys) + account_codes, -1))
    labels = np.concatenate([keys, accounts]).astype(object)
    kinds = np.array([EntityKind.API_KEY] * len(keys) + [EntityKind.ACCOUNT] * len(accounts), dtype=object)
    return codes, labels, kinds


def qualified(labels: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """`api_key:…` / `account:…` names: how fitted state remembers an entity."""
    return np.array([f"{k}:{v}" for k, v in zip(kinds, labels, strict=True)], dtype=object)


def pair_names(entities: np.ndarray, items: np.ndarray) -> pd.Index:
    return pd.Index(pd.Series(entities, dtype=object).astype(str) + _SEP + pd.Series(items, dtype=object).astype(str))


@dataclass(frozen=True)
class Habits:
    """What `fit` learned from history: which entities were seen, and which (entity, item) pairs."""

    entities: pd.Index
    pairs: pd.Index

    @classmethod
    def learn(cls, entity_names: np.ndarray, items: np.ndarray) -> Habits:
        """From one entity name and one item per row (None where unknown: such rows teach the entity
        only)."""
        entity_names = np.asarray(entity_names, dtype=object)
        items = np.asarray(items, dtype=object)
        named = pd.notna(entity_names)
        both = named & pd.notna(items)
        return cls(
            entities=pd.Index(pd.unique(entity_names[named])),
            pairs=pd.Index(pd.unique(pair_names(entity_names[both], items[both]))),
        )


@dataclass(frozen=True)
class Sightings:
    """One row per (entity, item) pair of a frame: when and where it was first seen."""

    codes: np.ndarray  # entity code
    items: np.ndarray  # item code
    first: np.ndarray  # µs of the first event with the pair
    rows: np.ndarray  # position of that event in the frame

    def __len__(self) -> int:
        return len(self.codes)


def first_sightings(codes: np.ndarray, items: np.ndarray, times: np.ndarray) -> Sightings:
    """The first event of every (entity, item) pair where both are known (codes >= 0).

    Of events at the same instant the earlier row wins; the time, and so every window and alert id
    built on it, is the same whatever the row order.
    """
    rows = np.flatnonzero((codes >= 0) & (items >= 0))
    if len(rows) == 0:
        empty = np.array([], dtype=np.int64)
        return Sightings(empty, empty, empty, empty)
    order = np.lexsort((rows, times[rows], items[rows], codes[rows]))
    rows = rows[order]
    c, i = codes[rows], items[rows]
    first = np.r_[True, (c[1:] != c[:-1]) | (i[1:] != i[:-1])]
    rows = rows[first]
    return Sightings(codes[rows], items[rows], times[rows], rows)


def entity_first_seen(codes: np.ndarray, times: np.ndarray, n_codes: int) -> np.ndarray:
    """µs of each entity's first event in the frame (never: int64 max)."""
    known = codes >= 0
    first = np.full(n_codes, _NEVER, dtype=np.int64)
    if known.any():
        found = pd.Series(times[known]).groupby(codes[known]).min()
        first[found.index.to_numpy()] = found.to_numpy()
    return first


def novel(
    sightings: Sightings,
    entity_first: np.ndarray,
    fitted_entity: np.ndarray,
    fitted_pair: np.ndarray,
    min_history_us: int,
    newcomers_after_us: int | None = None,
) -> np.ndarray:
    """Which first sightings are news for their entity.

    A pair is news when history does not know it (`fitted_pair` False) and the entity has a history
    to compare with: it was fitted, or it had been in the frame for `min_history_us` before the pair
    appeared. An entity seen from the first minute of the frame was probably there before it; only
    after `min_history_us` does its absence from a country or network mean something. Entities that
    first appear after `newcomers_after_us` (well after the frame starts, so they are really new)
    count as news with everything they do, when the caller passes it.
    """
    entity = sightings.codes
    known_long_enough = sightings.first - entity_first[entity] >= min_history_us
    news = ~fitted_pair & (fitted_entity[entity] | known_long_enough)
    if newcomers_after_us is not None:
        news |= ~fitted_pair & ~fitted_entity[entity] & (entity_first[entity] >= newcomers_after_us)
    return news


def fitted_flags(
    habits: Habits | None, entity_names: np.ndarray, sightings: Sightings, item_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(fitted per entity code, fitted per sighting) from what `fit` learned; all False unfitted."""
    if habits is None:
        return np.zeros(len(entity_names), dtype=bool), np.zeros(len(sightings), dtype=bool)
    fitted_entity = pd.Index(entity_names).isin(habits.entities)
    if len(sightings) == 0:
        return fitted_entity, np.zeros(0, dtype=bool)
    names = pair_names(entity_names[sightings.codes], item_labels[sightings.items])
    return fitted_entity, names.isin(habits.pairs)
