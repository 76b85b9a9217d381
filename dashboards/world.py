"""Country outlines for the world map, shipped with the package so the map never fetches anything.

plotly.js draws its own geo maps from TopoJSON fetched from a CDN at render time, which an
air-gapped dashboard or an offline report cannot do. Instead `world_110m.json` (beside this file)
holds every country's outline as plain longitude/latitude rings, and the map figure draws them as
filled shapes on ordinary axes (an equirectangular projection).

The file was derived once by `build()` from Natural Earth 1:110m admin-0 countries (public domain),
as packaged in the `world-atlas` npm package (countries-110m.json, TopoJSON), with ISO 3166 numeric
codes mapped to alpha-2 (the codes `iptocc` returns). Countries too small for that scale
(Singapore, Malta, Bahrain…) get a point instead of an outline.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

WORLD_FILE = "world_110m.json"

# Natural Earth features without an ISO numeric code: disputed areas drawn with the country
# that the ISO standard (and so `iptocc`) assigns their addresses to, and Kosovo's user code.
_UNCODED = {"N. Cyprus": "CY", "Somaliland": "SO", "Kosovo": "XK"}
# Outlines are stored at 0.1 degree (about 11 km): finer than a 1:110m map can show.
_PRECISION = 1


@lru_cache(maxsize=1)
def countries() -> dict[str, dict[str, Any]]:
    """Alpha-2 code -> {"name", "rings": [[lon, lat, lon, lat, …], …]} or {"name", "point": [lon, lat]}."""
    text = resources.files("dashboards").joinpath(WORLD_FILE).read_text(encoding="utf-8")
    return json.loads(text)["countries"]


def _decode_arcs(topology: dict[str, Any]) -> list[list[tuple[float, float]]]:
    """TopoJSON arcs are delta-encoded integers; the transform turns them into degrees."""
    (sx, sy), (tx, ty) = topology["transform"]["scale"], topology["transform"]["translate"]
    arcs = []
    for arc in topology["arcs"]:
        x = y = 0
        points = []
        for dx, dy in arc:
            x, y = x + dx, y + dy
            points.append((x * sx + tx, y * sy + ty))
        arcs.append(points)
    return arcs


def _rings(indices: list[int], arcs: list[list[tuple[float, float]]]) -> list[list[float]]:
    """One TopoJSON ring as flat [lon, lat, …] lists: itself, plus a copy shifted by 360 degrees
    when it crosses the antimeridian (Russia, Fiji), so each side of the map shows its part."""
    points: list[tuple[float, float]] = []
    for index in indices:
        # A negative index is the one's complement of an arc walked backwards.
        arc = arcs[index] if index >= 0 else arcs[~index][::-1]
        points.extend(arc if not points else arc[1:])
    flat: list[float] = []
    last = None
    shift = 0.0
    previous_lon = None
    for lon, lat in points:
        # Unwrap: a jump of more than half the globe is the ring crossing ±180, not a real edge.
        if previous_lon is not None and abs(lon - previous_lon) > 180:
            shift += 360.0 if previous_lon > lon else -360.0
        previous_lon = lon
        point = (round(lon + shift, _PRECISION), round(lat, _PRECISION))
        if point != last:
            flat.extend(point)
            last = point
    lons = flat[0::2]
    out = [flat]
    for offset in (-360.0, 360.0):
        if (offset < 0 and max(lons, default=0) > 180) or (offset > 0 and min(lons, default=0) < -180):
            copy = list(flat)
            copy[0::2] = [round(x + offset, _PRECISION) for x in lons]
            out.append(copy)
    return out


def build(topology_path: Path, codes_path: Path, out: Path) -> int:
    """Write WORLD_FILE from world-atlas' countries-110m.json and a list of ISO 3166 codes.

    `codes_path` is a JSON list of {"cca2", "ccn3", "name": {"common"}, "latlng": [lat, lon]}
    (the shape of the `world-countries` npm package's countries.json). Returns the country count.
    """
    topology = json.loads(topology_path.read_text(encoding="utf-8"))
    iso = json.loads(codes_path.read_text(encoding="utf-8"))
    alpha2 = {c["ccn3"]: c["cca2"] for c in iso if c.get("ccn3")}
    arcs = _decode_arcs(topology)
    out_countries: dict[str, dict[str, Any]] = {}
    for geometry in topology["objects"]["countries"]["geometries"]:
        name = geometry["properties"]["name"]
        code = alpha2.get(geometry.get("id") or "") or _UNCODED.get(name)
        if code is None or geometry["type"] not in ("Polygon", "MultiPolygon"):
            continue
        polygons = geometry["arcs"] if geometry["type"] == "MultiPolygon" else [geometry["arcs"]]
        rings = [part for polygon in polygons for ring in polygon for part in _rings(ring, arcs)]
        entry = out_countries.setdefault(code, {"name": name, "rings": []})
        entry["rings"].extend(r for r in rings if len(r) >= 6)
    for country in iso:
        code = country["cca2"]
        if code not in out_countries and country.get("latlng"):
            lat, lon = country["latlng"][:2]
            out_countries[code] = {"name": country["name"]["common"], "point": [round(lon, 2), round(lat, 2)]}
    document = {
        "source": "Natural Earth 1:110m admin-0 countries (public domain), via world-atlas countries-110m.json",
        "countries": dict(sorted(out_countries.items())),
    }
    out.write_text(json.dumps(document, separators=(",", ":")), encoding="utf-8")
    return len(out_countries)
