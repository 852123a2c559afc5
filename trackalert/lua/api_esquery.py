"""Lua global esQuery: a stored search of elasticqueries/queries/ on an Elasticsearch log.

For the questions the built-in helpers do not answer (aggregations over a login's history, a
network's newest failures): the operator keeps the search body in a file, reviewed like code,
and a policy passes only values (stored_queries.py: parameters are data in the parsed body).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from trackalert.eventlog.es_queries import ElasticQueries
from trackalert.lua.api_helpers import HELPERS, _as_of
from trackalert.lua.convert import describe, is_table
from trackalert.lua.registry import lua_global
from trackalert.lua.stored_queries import StoredQueryError, load_query

if TYPE_CHECKING:
    from trackalert.lua.state import LuaState


def _log_queries(state: "LuaState") -> ElasticQueries:
    log = state.host.eventlog
    if log is None:
        raise RuntimeError("esQuery: the event log is not open yet")
    queries = log.queries()
    if not isinstance(queries, ElasticQueries):
        raise RuntimeError(f"esQuery needs an Elasticsearch event log; this one is {log!r} "
                           "(use the built-in helpers, e.g. countReports, topValues)")
    return queries


def _params(name: str, value: Any, state: "LuaState") -> dict[str, Any]:
    if value is None:
        return {}
    if not is_table(value):
        raise StoredQueryError(f"esQuery {name!r}: params must be a table, got {describe(value)}")
    params: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise StoredQueryError(f"esQuery {name!r}: parameter names are strings, got {key!r}")
        params[key] = state.values.plain(item)  # a ComboAddress/Netmask as its text
    return params


@lua_global(
    "esQuery", HELPERS, "esQuery(name, params) -> response",
    """Runs the stored search `elasticqueries/queries/<name>.json` on the Elasticsearch event
    log's events index and returns the decoded response as tables (`aggregations`, `hits.hits`
    with `_source`, ...). `params` fills the file's placeholders: a JSON string value that is
    exactly `"{{login}}"` (a string) or `"{{n:integer}}"` (`string`, `number`, `integer`,
    `boolean`) is replaced by the value, as data, in the parsed body: no value is ever read as
    JSON or query syntax. An unknown query, a missing or unknown parameter or one of the wrong
    type raises a Lua error naming it. As-of: inside `report(lt)` the search sees only events
    logged before `lt` (a `seq` filter is added); elsewhere events received up to now. Relative
    dates in a file (`now-30d`) are the cluster's clock, not lt's: pass a `number` parameter over
    `received` for a window that follows lt. `alerts_*` files are for the alerts index (use
    countAlerts/recentAlerts). On a SQLite event log it raises an error.""",
    example='local r = esQuery("login_history", {login=lt.login})\n'
            'for _, b in ipairs(r.aggregations.countries.buckets) do\n'
            '  infoLog("seen from", {country=b.key, n=b.doc_count})\nend',
    topic="helpers",
)
def _es_query(state: "LuaState") -> Callable[[Any, Any], Any]:
    def es_query(name: Any, params: Any = None) -> Any:
        query = load_query(name)
        if query.name.startswith("alerts_"):
            raise StoredQueryError(f"esQuery {query.name!r}: alerts_* queries are for the alerts "
                                   "index; esQuery searches the events index")
        body = query.bind(_params(query.name, params, state))
        response = _log_queries(state).search_body(body, _as_of(state))
        return state.values.to_lua(response)

    return es_query
