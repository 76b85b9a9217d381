"""Offline geo lookups: country of an address (iptocc), and city coordinates and ASN from optional .mmdb files."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.schema import ConfigError

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0
# Distinct addresses remembered per lookup kind. A week of a big service has a few hundred thousand;
# past this the cache starts over rather than growing without bound in a long-running service.
CACHE_LIMIT = 2_000_000

# Rough centre (latitude, longitude) of each country by ISO 3166-1 alpha-2 code: the capital or the
# middle of where people live, whichever is more telling. Country-level geo cannot do better than
# this, so a few hundred kilometres either way does not matter; what matters is that far is far.
COUNTRY_CENTROIDS: dict[str, tuple[float, float]] = {
    "AD": (42.5, 1.5), "AE": (24.0, 54.0), "AF": (34.5, 69.2), "AG": (17.1, -61.8), "AI": (18.2, -63.1),
    "AL": (41.2, 20.0), "AM": (40.2, 44.5), "AO": (-12.3, 17.5), "AQ": (-75.0, 0.0), "AR": (-34.6, -58.4),
    "AS": (-14.3, -170.7), "AT": (47.6, 14.1), "AU": (-25.0, 134.0), "AW": (12.5, -70.0), "AX": (60.2, 20.0),
    "AZ": (40.4, 47.8), "BA": (44.0, 17.8), "BB": (13.2, -59.5), "BD": (23.7, 90.4), "BE": (50.8, 4.5),
    "BF": (12.3, -1.6), "BG": (42.7, 25.3), "BH": (26.1, 50.5), "BI": (-3.4, 29.9), "BJ": (9.3, 2.3),
    "BL": (17.9, -62.8), "BM": (32.3, -64.8), "BN": (4.5, 114.7), "BO": (-16.5, -64.7), "BQ": (12.2, -68.3),
    "BR": (-14.0, -51.0), "BS": (24.7, -77.8), "BT": (27.5, 90.4), "BV": (-54.4, 3.4), "BW": (-22.3, 24.7),
    "BY": (53.7, 27.9), "BZ": (17.2, -88.5), "CA": (56.0, -106.0), "CC": (-12.2, 96.8), "CD": (-2.9, 23.7),
    "CF": (6.6, 20.9), "CG": (-0.7, 15.2), "CH": (46.8, 8.2), "CI": (7.5, -5.5), "CK": (-21.2, -159.8),
    "CL": (-33.4, -70.7), "CM": (5.7, 12.4), "CN": (35.0, 105.0), "CO": (4.6, -74.1), "CR": (9.9, -84.1),
    "CU": (21.5, -79.5), "CV": (15.1, -23.6), "CW": (12.2, -69.0), "CX": (-10.5, 105.7), "CY": (35.1, 33.4),
    "CZ": (49.8, 15.5), "DE": (51.0, 10.0), "DJ": (11.8, 42.6), "DK": (56.0, 10.0), "DM": (15.4, -61.4),
    "DO": (18.7, -70.2), "DZ": (28.0, 2.6), "EC": (-1.8, -78.2), "EE": (58.7, 25.0), "EG": (26.8, 30.8),
    "EH": (24.2, -12.9), "ER": (15.2, 39.8), "ES": (40.0, -4.0), "ET": (9.1, 40.5), "FI": (62.0, 26.0),
    "FJ": (-17.7, 178.1), "FK": (-51.8, -59.5), "FM": (6.9, 158.2), "FO": (62.0, -6.9), "FR": (46.5, 2.5),
    "GA": (-0.8, 11.6), "GB": (54.0, -2.0), "GD": (12.1, -61.7), "GE": (42.3, 43.4), "GF": (4.0, -53.1),
    "GG": (49.5, -2.6), "GH": (7.9, -1.0), "GI": (36.1, -5.4), "GL": (72.0, -40.0), "GM": (13.4, -15.3),
    "GN": (10.0, -10.9), "GP": (16.2, -61.6), "GQ": (1.6, 10.3), "GR": (39.1, 21.8), "GS": (-54.4, -36.6),
    "GT": (15.8, -90.2), "GU": (13.4, 144.8), "GW": (11.8, -15.2), "GY": (4.9, -58.9), "HK": (22.3, 114.2),
    "HM": (-53.1, 73.5), "HN": (15.2, -86.2), "HR": (45.1, 15.2), "HT": (19.0, -72.3), "HU": (47.2, 19.5),
    "ID": (-2.0, 118.0), "IE": (53.2, -8.0), "IL": (31.5, 34.9), "IM": (54.2, -4.5), "IN": (21.0, 78.0),
    "IO": (-6.3, 71.9), "IQ": (33.2, 43.7), "IR": (32.4, 53.7), "IS": (64.9, -19.0), "IT": (42.8, 12.8),
    "JE": (49.2, -2.1), "JM": (18.1, -77.3), "JO": (31.0, 36.2), "JP": (36.0, 138.0), "KE": (0.0, 37.9),
    "KG": (41.2, 74.8), "KH": (12.6, 105.0), "KI": (1.9, -157.4), "KM": (-11.9, 43.9), "KN": (17.3, -62.7),
    "KP": (40.3, 127.5), "KR": (36.5, 127.8), "KW": (29.3, 47.5), "KY": (19.3, -81.3), "KZ": (48.0, 67.0),
    "LA": (19.9, 102.5), "LB": (33.9, 35.9), "LC": (13.9, -61.0), "LI": (47.2, 9.6), "LK": (7.9, 80.8),
    "LR": (6.4, -9.4), "LS": (-29.6, 28.2), "LT": (55.2, 23.9), "LU": (49.8, 6.1), "LV": (56.9, 24.6),
    "LY": (26.3, 17.2), "MA": (31.8, -7.1), "MC": (43.7, 7.4), "MD": (47.4, 28.4), "ME": (42.7, 19.4),
    "MF": (18.1, -63.1), "MG": (-18.8, 46.9), "MH": (7.1, 171.2), "MK": (41.6, 21.7), "ML": (17.6, -4.0),
    "MM": (21.9, 95.9), "MN": (46.9, 103.8), "MO": (22.2, 113.5), "MP": (15.1, 145.7), "MQ": (14.6, -61.0),
    "MR": (21.0, -10.9), "MS": (16.7, -62.2), "MT": (35.9, 14.4), "MU": (-20.3, 57.6), "MV": (3.2, 73.2),
    "MW": (-13.3, 34.3), "MX": (23.0, -102.0), "MY": (4.2, 101.98), "MZ": (-18.7, 35.5), "NA": (-22.9, 18.5),
    "NC": (-20.9, 165.6), "NE": (17.6, 8.1), "NF": (-29.0, 168.0), "NG": (9.0, 8.0), "NI": (12.9, -85.2),
    "NL": (52.2, 5.3), "NO": (60.5, 8.5), "NP": (28.4, 84.1), "NR": (-0.5, 166.9), "NU": (-19.1, -169.9),
    "NZ": (-41.0, 174.0), "OM": (21.5, 55.9), "PA": (8.5, -80.8), "PE": (-9.2, -75.0), "PF": (-17.7, -149.4),
    "PG": (-6.3, 143.9), "PH": (12.9, 121.8), "PK": (30.4, 69.3), "PL": (52.0, 19.0), "PM": (46.9, -56.3),
    "PN": (-24.7, -127.4), "PR": (18.2, -66.6), "PS": (31.9, 35.2), "PT": (39.6, -8.0), "PW": (7.5, 134.6),
    "PY": (-23.4, -58.4), "QA": (25.4, 51.2), "RE": (-21.1, 55.5), "RO": (45.9, 25.0), "RS": (44.0, 21.0),
    "RU": (55.8, 37.6), "RW": (-1.9, 29.9), "SA": (23.9, 45.1), "SB": (-9.6, 160.2), "SC": (-4.7, 55.5),
    "SD": (12.9, 30.2), "SE": (62.0, 15.0), "SG": (1.35, 103.8), "SH": (-15.96, -5.7), "SI": (46.2, 14.99),
    "SJ": (78.2, 15.6), "SK": (48.7, 19.7), "SL": (8.5, -11.8), "SM": (43.9, 12.5), "SN": (14.5, -14.5),
    "SO": (5.2, 46.2), "SR": (3.9, -56.0), "SS": (6.9, 31.3), "ST": (0.2, 6.6), "SV": (13.8, -88.9),
    "SX": (18.0, -63.1), "SY": (34.8, 39.0), "SZ": (-26.5, 31.5), "TC": (21.7, -71.8), "TD": (15.5, 18.7),
    "TF": (-49.3, 69.3), "TG": (8.6, 0.8), "TH": (15.9, 100.99), "TJ": (38.9, 71.3), "TK": (-9.2, -171.8),
    "TL": (-8.9, 125.7), "TM": (38.97, 59.6), "TN": (33.9, 9.5), "TO": (-21.2, -175.2), "TR": (39.0, 35.0),
    "TT": (10.7, -61.2), "TV": (-7.1, 177.6), "TW": (23.7, 121.0), "TZ": (-6.4, 34.9), "UA": (49.0, 32.0),
    "UG": (1.4, 32.3), "UM": (19.3, 166.6), "US": (39.0, -98.0), "UY": (-32.5, -55.8), "UZ": (41.4, 64.6),
    "VA": (41.9, 12.45), "VC": (13.3, -61.2), "VE": (6.4, -66.6), "VG": (18.4, -64.6), "VI": (18.3, -64.9),
    "VN": (16.0, 108.0), "VU": (-15.4, 166.96), "WF": (-13.8, -177.2), "WS": (-13.8, -172.1), "XK": (42.6, 20.9),
    "YE": (15.6, 48.5), "YT": (-12.8, 45.2), "ZA": (-29.0, 24.0), "ZM": (-13.1, 27.8), "ZW": (-19.0, 29.2),
}


# Registry codes for blocks assigned to a whole region rather than a country: they say nothing about
# where the address is, and "EU" next to "DE" must not look like a move between countries.
_REGIONS = frozenset({"EU", "AP"})


def _mapped_v4(ip: str) -> str:
    """`::ffff:192.0.2.1` is an IPv4 client seen through a dual-stack socket: look up the IPv4 address."""
    if ip[:7].lower() == "::ffff:" and "." in ip:
        return ip[7:]
    return ip


def _unique_lookup(
    ips: pd.Series, cache: dict[str, Any], resolve: Callable[[list[str]], list[Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """(code per row, value per distinct address): `resolve` runs once per address never seen before.

    The work is per distinct address, not per event: a week of events has far fewer addresses than
    lines, and the cache carries them over from one detect run to the next.
    """
    codes, uniques = pd.factorize(ips.astype("string"), use_na_sentinel=True)
    uniques = [str(u) for u in uniques]
    missing = [u for u in uniques if u not in cache]
    if missing:
        if len(cache) + len(missing) > CACHE_LIMIT:
            cache.clear()
        cache.update(zip(missing, resolve(missing), strict=True))
    values = np.empty(len(uniques), dtype=object)
    values[:] = [cache[u] for u in uniques]
    return codes, values


def _spread(codes: np.ndarray, values: np.ndarray, default: Any) -> np.ndarray:
    """Per-row values from per-distinct values; rows without an address get `default`."""
    table = np.empty(len(values) + 1, dtype=object)
    table[: len(values)] = values
    table[-1] = default
    return table[np.where(codes < 0, len(values), codes)]


class Geo:
    """Geo lookups for detectors; open once (the .mmdb files are read at construction), then pure.

    Country comes from iptocc, the registries' delegation data built into its wheel: it says where an
    address is registered, which for most access networks is where it is used, and it needs no
    download. A MaxMind-format City database (GeoLite2-City, DB-IP City Lite, IPinfo), when
    configured, adds coordinates and its own country, which wins because it says where the address is
    used (a cloud region abroad is registered at the provider's home). An ASN database adds the
    network's number and owner for evidence.
    """

    def __init__(self, city_mmdb: str | Path | None = None, asn_mmdb: str | Path | None = None):
        self._city = _open_mmdb(city_mmdb, "geo_city_mmdb")
        self._asn = _open_mmdb(asn_mmdb, "geo_asn_mmdb")
        self._countries: dict[str, str | None] = {}
        # Per address: (lat, lon, country) from the City database, either coordinate None when it
        # knows only the country; None when it does not know the address.
        self._places: dict[str, tuple[float | None, float | None, str | None] | None] = {}
        self._networks: dict[str, tuple[int, str | None] | None] = {}

    @classmethod
    def from_settings(cls, settings: Any) -> Geo:
        """From `geo_city_mmdb` and `geo_asn_mmdb` of pipeline.config.Settings (both optional)."""
        return cls(getattr(settings, "geo_city_mmdb", None), getattr(settings, "geo_asn_mmdb", None))

    @property
    def has_cities(self) -> bool:
        return self._city is not None

    @property
    def has_asns(self) -> bool:
        return self._asn is not None

    def close(self) -> None:
        for reader in (self._city, self._asn):
            if reader is not None:
                reader.close()

    def __repr__(self) -> str:
        return f"Geo(cities={self.has_cities}, asns={self.has_asns})"

    # ---- lookups -------------------------------------------------------------------------------

    def countries(self, ips: pd.Series) -> pd.Series:
        """ISO 3166-1 alpha-2 code per address (string dtype, same index); <NA> where unknown
        (private, reserved, malformed or unallocated addresses, blocks registered to a whole region)."""
        codes, values = _unique_lookup(ips, self._countries, self._resolve_countries)
        return pd.Series(_spread(codes, values, None), index=ips.index, dtype="string", name="country")

    def locations(self, ips: pd.Series) -> pd.DataFrame:
        """Coordinates per address: columns `lat`, `lon` (Float64) and `precise` (bool).

        Precise coordinates come from the City database; without one, or for an address it does
        not know, the centre of the address's country stands in (`precise` False); <NA> when even
        the country is unknown.
        """
        country = self.countries(ips)
        lat, lon = centroids(country)
        precise = np.zeros(len(ips), dtype=bool)
        if self._city is not None:
            codes, values = _unique_lookup(ips, self._places, self._resolve_places)
            place = _spread(codes, values, None)
            known = np.array([p is not None and p[0] is not None for p in place], dtype=bool)
            if known.any():
                lat[known] = [p[0] for p in place[known]]
                lon[known] = [p[1] for p in place[known]]
                precise = known
        return pd.DataFrame(
            {
                "lat": pd.array(lat, dtype="Float64"),
                "lon": pd.array(lon, dtype="Float64"),
                "precise": precise,
            },
            index=ips.index,
        )

    def asns(self, ips: pd.Series) -> pd.DataFrame:
        """Autonomous system per address: `asn` (Int64) and `as_org` (string); <NA> without an ASN
        database or for addresses it does not know."""
        if self._asn is None:
            return pd.DataFrame(
                {"asn": pd.array([pd.NA] * len(ips), dtype="Int64"),
                 "as_org": pd.array([pd.NA] * len(ips), dtype="string")},
                index=ips.index,
            )
        codes, values = _unique_lookup(ips, self._networks, self._resolve_networks)
        found = _spread(codes, values, None)
        return pd.DataFrame(
            {
                "asn": pd.array([f[0] if f else pd.NA for f in found], dtype="Int64"),
                "as_org": pd.array([f[1] if f else pd.NA for f in found], dtype="string"),
            },
            index=ips.index,
        )

    # ---- resolvers (once per distinct address) --------------------------------------------------

    def _resolve_countries(self, ips: list[str]) -> list[str | None]:
        import iptocc

        found = [None if c in _REGIONS else c for c in iptocc.country_code([_mapped_v4(ip) for ip in ips])]
        if self._city is not None:
            _unique_lookup(pd.Series(ips, dtype="string"), self._places, self._resolve_places)
            places = [self._places.get(ip) for ip in ips]
            found = [p[2] if p is not None and p[2] else c for p, c in zip(places, found, strict=True)]
        return found

    def _resolve_places(self, ips: list[str]) -> list[tuple[float | None, float | None, str | None] | None]:
        return [self._place(ip) for ip in ips]

    def _place(self, ip: str) -> tuple[float | None, float | None, str | None] | None:
        record = _get(self._city, ip)
        if not isinstance(record, dict):
            return None
        location = record.get("location") or {}
        lat, lon = location.get("latitude"), location.get("longitude")
        country = (record.get("country") or {}).get("iso_code")
        if lat is None or lon is None:
            return None if country is None else (None, None, country)
        return float(lat), float(lon), country

    def _resolve_networks(self, ips: list[str]) -> list[tuple[int, str | None] | None]:
        out: list[tuple[int, str | None] | None] = []
        for ip in ips:
            record = _get(self._asn, ip)
            number = record.get("autonomous_system_number") if isinstance(record, dict) else None
            out.append(None if number is None else (int(number), record.get("autonomous_system_organization")))
        return out


def _open_mmdb(path: str | Path | None, setting: str) -> Any:
    if path is None or str(path) == "":
        return None
    import maxminddb

    try:
        return maxminddb.open_database(str(Path(path).expanduser()))
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise ConfigError(f"{setting}: cannot open {path} as a MaxMind database ({exc})") from None


def _get(reader: Any, ip: str) -> Any:
    try:
        return reader.get(_mapped_v4(ip))
    except (ValueError, TypeError):  # not an address, or IPv6 in an IPv4-only database
        return None


# ---- pure helpers ------------------------------------------------------------------------------

_DEFAULT: Geo | None = None


def default_geo() -> Geo:
    """The country-only Geo (no .mmdb files): what detectors use when the job gave them none."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Geo()
    return _DEFAULT


def countries(ips: pd.Series, geo: Geo | None = None) -> pd.Series:
    """Country code per address (see Geo.countries)."""
    return (geo or default_geo()).countries(ips)


def locations(ips: pd.Series, geo: Geo | None = None) -> pd.DataFrame:
    """Coordinates per address (see Geo.locations)."""
    return (geo or default_geo()).locations(ips)


def centroids(codes: pd.Series | Iterable[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) float arrays of the country centres; NaN for unknown codes."""
    series = pd.Series(codes, dtype="string") if not isinstance(codes, pd.Series) else codes.astype("string")
    table = pd.DataFrame.from_dict(COUNTRY_CENTROIDS, orient="index", columns=["lat", "lon"])
    found = table.reindex(series.fillna("").to_numpy())
    return found["lat"].to_numpy(dtype=float, copy=True), found["lon"].to_numpy(dtype=float, copy=True)


def distance_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance (haversine) between arrays of points in degrees; NaN where a point is unknown."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2, dtype=float) - np.asarray(lon1, dtype=float))
    h = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))
