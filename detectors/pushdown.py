"""Candidate pushdown: what a detector tells the detect job so the database can skip most raw rows.

A detector's `pushdown()` describes, without touching a database, a necessary condition for any
alert it could raise: per entity (a column) and time bucket, a few counts the database computes
(`Measure`), and a `pick` that names the entities whose counts could still reach a threshold. The
job then loads only those entities' rows (plus any `rows` the detector reads whatever the entity)
and hands them to the unchanged `detect`. The contract that makes this exact: every alert the
detector could raise depends only on rows of picked entities (and on the `rows`): an entity's own,
or, where alerts sum over entities (a subnet's addresses, a spray's), every entity that could add
to the sum is picked. Leaving the others out changes nothing but the cost. What a detector assumes
its frame covers comes from the whole frame's first event (detectors.base.FRAME_START_US).

A window of length w always lies within two adjacent buckets of width w, so "some window holds at
least n" implies "some pair of adjacent buckets sums to at least n": `busy` is that test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

# Entity columns a pushdown may group by; "credential" is the key when the event names one, else
# the account (detectors.history.credentials), as "k:<key>" / "a:<account>".
ENTITIES = ("source_ip", "api_key_id", "account", "credential")
OPS = ("eq", "in", "ieq", "null", "notnull", "contains", "prefix")


@dataclass(frozen=True)
class Clause:
    """One test on a column: eq/in (null never matches), ieq (case-insensitive eq), null, notnull,
    contains (substring: a superset test for `|`-joined flags), prefix (case-sensitive starts-with)."""

    column: str
    op: str
    value: Any = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown clause op {self.op!r} (one of {', '.join(OPS)})")


@dataclass(frozen=True)
class Rows:
    """Rows where every `all_of` clause holds, at least one `any_of` clause (when given), and not
    every `none_of` clause (when given). Null-safe: a null column fails eq/in/ieq/contains."""

    all_of: tuple[Clause, ...] = ()
    any_of: tuple[Clause, ...] = ()
    none_of: tuple[Clause, ...] = ()


@dataclass(frozen=True)
class Measure:
    """Per entity and bucket: the number of matching rows, or the sum of a column over them, or
    the number of distinct values of a column among them, or (`first`) the epoch second of the
    earliest of them (NaN when none)."""

    rows: Rows = field(default_factory=Rows)
    total: str | None = None
    distinct: str | None = None
    first: bool = False


@dataclass(frozen=True)
class Pushdown:
    """A detector's necessary condition, for the job to evaluate in the database.

    `by` None with `rows`: the detector reads only those rows. Otherwise the database returns one
    row per (entity, bucket) with the `measures` as columns (`bucket` None: one row per entity over
    the whole frame; `per`, a column: one row per entity and value of it, e.g. its addresses) and
    `pick` names the candidate entities. `local`: an entity's alerts depend on its rows alone (not
    on other entities', as a subnet's or a spray's do), so the job may run the candidates in
    groups, which bounds memory even when many entities qualify. `skip` means no alert is possible
    (e.g. an untrained model), so the detector is not run at all.
    """

    by: str | None = None
    per: str | None = None
    bucket: timedelta | None = None
    measures: Mapping[str, Measure] = field(default_factory=dict)
    pick: Callable[[pd.DataFrame], Iterable[Any]] | None = None
    rows: tuple[Rows, ...] = ()
    skip: bool = False
    local: bool = False

    def __post_init__(self) -> None:
        if self.by is not None and self.by not in ENTITIES:
            raise ValueError(f"cannot push down by {self.by!r} (one of {', '.join(ENTITIES)})")
        if self.per is not None and self.per not in ENTITIES[:3]:
            raise ValueError(f"cannot push down per {self.per!r}")
        if self.by is not None and self.pick is None:
            raise ValueError("a pushdown by entity needs a pick")


SKIP = Pushdown(skip=True)


def busy(table: pd.DataFrame, by: str, column: str, at_least: float, group: Any = None) -> set[Any]:
    """Entities with some pair of adjacent buckets (or one bucket) whose `column` sums to at least
    `at_least`. With `group` (a function of the entity labels), the sums are per group and every
    entity of a busy group is returned."""
    if table.empty:
        return set()
    keys = table[by] if group is None else pd.Series(group(table[by].to_numpy(dtype=object)), index=table.index)
    frame = pd.DataFrame({"key": keys.to_numpy(dtype=object), "bucket": table["bucket"].to_numpy(),
                          "value": table[column].to_numpy(dtype=np.float64)})
    frame = frame[frame["key"].notna()]
    if frame.empty:
        return set()
    per = frame.groupby(["key", "bucket"], sort=True)["value"].sum().reset_index()
    value = per["value"].to_numpy()
    same = np.r_[False, (per["key"].to_numpy()[1:] == per["key"].to_numpy()[:-1])]
    step = np.r_[0, np.diff(per["bucket"].to_numpy().astype(np.int64))]
    width = _width(table)
    adjacent = same & (step == width)
    pair = value + np.where(adjacent, np.r_[0.0, value[:-1]], 0.0)
    hot = set(per["key"].to_numpy()[(pair >= at_least) | (value >= at_least)])
    if group is None:
        return hot
    return set(table[by].to_numpy(dtype=object)[np.isin(keys.to_numpy(dtype=object), list(hot))])


def _width(table: pd.DataFrame) -> int:
    # Buckets are epoch seconds aligned to the width the job used; it is kept on the frame.
    return int(table.attrs.get("bucket_seconds", 0))


def busy_ips(rows: Rows, window: timedelta, at_least: float) -> Pushdown:
    """IPs with at least `at_least` of these rows in some window: the condition of the rules that
    count one IP's failures or misses in a sliding window (each IP's alerts from its rows alone)."""
    return Pushdown(local=True, by="source_ip", bucket=window, measures={"events": Measure(rows)},
                    pick=lambda table: busy(table, "source_ip", "events", at_least))


def placed_credentials(geo: Any, need_known: int) -> Pushdown:
    """Credentials with at least two addresses among their accepted events, `need_known` of them
    placed in a country by `geo`: where a geography rule can see a credential move or arrive."""
    from pipeline.schema import Outcome

    accepted = Rows(none_of=(Clause("outcome", "eq", Outcome.AUTH_FAILED.value),))

    def pick(table: pd.DataFrame) -> set[Any]:
        if table.empty:
            return set()
        placed = geo.countries(pd.Series(table["source_ip"].to_numpy(dtype=object), dtype="string")).notna()
        per = table.assign(placed=placed.to_numpy(dtype=bool)).groupby("credential", sort=False)
        ips, known = per["source_ip"].nunique(), per["placed"].sum()
        return set(ips.index[(ips.to_numpy() >= 2) & (known.to_numpy() >= need_known)])

    return Pushdown(by="credential", per="source_ip", measures={"events": Measure(accepted)}, pick=pick, local=True)
