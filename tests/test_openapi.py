"""`GET /openapi.json` is kept true: every route in the route table (the Router's paths and
prefixes, the quart app's url_map) is documented, nothing absent is, each documented method
is answered and every other method on a Router path is a 405; the document is valid OpenAPI
3.1 and served without a credential."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

from daemon.api.app import create_quart_app, route_table
from daemon.api.openapi import PATHS, document
from daemon.api.serve import RunningDaemon
from tests.consumer_harness import ADMIN, Api

_METHODS = {"get", "post", "put", "patch", "delete"}
_UNDOCUMENTED = {"/ws/provider"}  # a WebSocket; named in info.description


def _router_paths(daemon: RunningDaemon) -> set[str]:
    routes, prefixes = route_table(daemon.supervisor)
    exact = {path for kind, path in routes if kind == "http"}
    assert {path for kind, path in routes if kind != "http"} == _UNDOCUMENTED
    prefixed = {
        doc_path
        for _, prefix in prefixes
        for doc_path in PATHS
        if doc_path.startswith(prefix) and re.fullmatch(r"\{\w+\}", doc_path[len(prefix) :])
    }
    assert len(prefixed) == len(prefixes), "a prefix has no documented {id} path"
    return exact | prefixed


def _quart_operations(daemon: RunningDaemon) -> set[tuple[str, str]]:
    app = create_quart_app(daemon.supervisor)
    return {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods or ()
        if method.lower() in _METHODS
    }


def _documented(paths: set[str]) -> set[tuple[str, str]]:
    return {(path, method) for path in paths for method in PATHS[path]}


async def test_every_route_is_documented_and_nothing_else(daemon: RunningDaemon) -> None:
    router = _router_paths(daemon)
    quart = _quart_operations(daemon)
    assert set(PATHS) == router | {path for path, _ in quart}
    assert _documented(set(PATHS) - router) == quart


async def test_router_paths_answer_only_their_documented_methods(api: Api) -> None:
    for path in _router_paths(api.daemon):
        concrete = path.replace("{model}", "m")
        for method in _METHODS:
            response = await api.client.request(method, concrete, headers=api.auth)
            documented = method in PATHS[path]
            assert (response.status_code == 405) is not documented, (method, path)


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(document())


async def test_served_to_a_consumer_key_and_holds_no_secret(api: Api) -> None:
    assert (await api.client.get("/openapi.json")).status_code == 401
    response = await api.client.get("/openapi.json", headers=api.auth)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == document()
    text = response.text
    assert api.key not in text and ADMIN["Authorization"].split()[1] not in text
    assert api.daemon.base_url.removeprefix("http://") not in text
