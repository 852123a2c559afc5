"""How far a report's place is from a point: one formula, written once for Python and once for SQL.

countNear asks how many of an account's newest reports were located near a point (the starter
impossible_travel policy's "is this a place the account uses?"). Crossing 200 rows into Lua to
measure them there cost ~0.2 ms a call at 10M events; counting them where they are read is one
aggregate over the login index. Both forms must give the same count as the other backends and
the projection path, so the SQL expression is the Python function's operations in the same
order, each the C library's (sin, cos, asin, sqrt, pow), on bound doubles: no rounding differs.
"""

from __future__ import annotations

import math
from typing import Iterable

#: Mean Earth radius of the haversine formula (the starter policy's), km.
EARTH_KM = 6371.0
#: Degrees to radians, computed once here and bound into SQL (not SQLite's pi(), nor radians()).
RADIANS = math.pi / 180


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """The great-circle (haversine) distance between two places in degrees."""
    r = RADIANS
    a = (math.sin((lat2 - lat1) * r / 2) ** 2
         + math.cos(lat1 * r) * math.cos(lat2 * r) * math.sin((lon2 - lon1) * r / 2) ** 2)
    return 2 * EARTH_KM * math.asin(min(1, math.sqrt(a)))


#: `distance_km(latitude, longitude, ?, ?) < ?` over a row's columns, with params from
#: `near_params`: the same operations in the same order, after two cheap checks that leave out
#: rows certainly further than `km` (so an attacker's far place skips the trigonometry).
NEAR_SQL = (
    "abs(? - latitude) * ? < ? AND min(abs(? - longitude), 360 - abs(? - longitude)) * ? < ? AND "
    "2 * ? * asin(min(1, sqrt(pow(sin((? - latitude) * ? / 2), 2)"
    " + cos(latitude * ?) * cos(? * ?) * pow(sin((? - longitude) * ? / 2), 2)))) < ?"
)

#: The checks leave out a row only when its bound is past km by this much more than any
#: rounding of the formula (~1e-8 relative at worst, where asin nears 1).
_MARGIN = 1e-6


def near_params(latitude: float, longitude: float, km: float) -> list[float]:
    """The parameters of NEAR_SQL. Its two checks are lower bounds of the distance d:

    * along a meridian: d >= R * |dlat| (radians);
    * across: a row that passed the first check has |lat| < |latitude| + km/R = P, so
      haversine's a >= cos(P)^2 * sin(|dlon|/2)^2, with |dlon| wrapped into [0, pi]; as
      sin(x) >= 2x/pi there and asin(y) >= y, d >= (2R/pi) * cos(P) * |dlon|.
    """
    r = RADIANS
    limit = km * (1 + _MARGIN) + _MARGIN
    widest = abs(latitude) + limit / (EARTH_KM * r)  # P in degrees
    across = 0.0 if widest >= 90 else 2 * EARTH_KM / math.pi * math.cos(widest * r) * r
    return [latitude, EARTH_KM * r, limit, longitude, longitude, across * (1 - _MARGIN), limit,
            EARTH_KM, latitude, r, r, latitude, r, longitude, r, km]


def count_near(places: Iterable[tuple], latitude: float, longitude: float, km: float,
               enough: int | None = None) -> int:
    """How many (latitude, longitude) pairs are located (neither None) closer than `km`;
    counting stops at `enough`."""
    if enough is not None and enough <= 0:
        return 0
    found = 0
    for lat, lon in places:
        if lat is not None and lon is not None and distance_km(lat, lon, latitude, longitude) < km:
            found += 1
            if found == enough:
                break
    return found
