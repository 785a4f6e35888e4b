"""The configurator's REST API on a file store, with the real ``nginx -t`` as the
checker and a reload command that counts its runs: every status and body exact."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from consulate.control.configurator import nginx_conf
from consulate.control.configurator.api import build_app
from consulate.control.configurator.engine import Configurator, Template
from consulate.control.configurator.stores import FileStore, pretty
from consulate.control.configurator.target import TargetFile
from consulate.control.configurator.transformers import make_transformer

Client = TestClient  # type: ignore[type-arg]


def initial(work: Path) -> dict[str, Any]:
    return {"pid": str(work / "nginx.pid"), "error_log": str(work / "error.log"),
            "events": {}, "http": {"access_log": "off",
                                   "server": {"listen": "127.0.0.1:18080",
                                              "location /": {"return": "200 'hi'"}}}}


class Setup:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.store_path = work / "doc.json"
        self.target = work / "nginx.conf"
        self.reloads = work / "reloads"

    def reload_count(self) -> int:
        return len(self.reloads.read_text().splitlines()) if self.reloads.exists() else 0


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    found = Setup(tmp_path)
    found.store_path.write_bytes(pretty(initial(tmp_path)))
    return found


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[Client]:
    template = Template(make_transformer("nginx-conf"), TargetFile(setup.target),
                        f"nginx -t -q -p {setup.work} -c {{{{.src}}}}")
    configurator = Configurator(FileStore(setup.store_path), [template],
                                reload=f"echo reload >> {setup.reloads}")
    await configurator.start()
    try:
        async with TestClient(TestServer(build_app(configurator))) as running:
            yield running
    finally:
        await configurator.close()


async def _call(client: Client, method: str, path: str, body: Any = None,
                raw: bytes | None = None) -> tuple[int, str]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    response = await client.request(method, path, data=data)
    return response.status, await response.text()


async def test_start_renders_the_document(client: Client, setup: Setup) -> None:
    assert setup.target.read_text() == nginx_conf.render(initial(setup.work))
    assert setup.reload_count() == 1
    status, body = await _call(client, "GET", "/v1/config/http/server/listen")
    assert (status, json.loads(body)) == (200, "127.0.0.1:18080")
    assert await _call(client, "GET", "/v1/render") == (200, setup.target.read_text())


async def test_put_post_delete_walk(client: Client, setup: Setup) -> None:
    status, body = await _call(client, "PUT", "/v1/config/http/upstream%20app",
                               {"server": ["127.0.0.1:9001"]})
    assert (status, json.loads(body)) == (200, {"server": ["127.0.0.1:9001"]})
    status, body = await _call(client, "POST", "/v1/config/http/upstream%20app/server",
                               "127.0.0.1:9002")
    assert (status, json.loads(body)) == (200, ["127.0.0.1:9001", "127.0.0.1:9002"])
    status, _ = await _call(client, "PUT", "/v1/config/http/server/location%20%2F",
                            {"proxy_pass": "http://app"})
    assert status == 200
    expected = initial(setup.work)
    expected["http"]["upstream app"] = {"server": ["127.0.0.1:9001", "127.0.0.1:9002"]}
    expected["http"]["server"]["location /"] = {"proxy_pass": "http://app"}
    assert setup.store_path.read_bytes() == pretty(expected)  # written back pretty
    assert setup.target.read_text() == nginx_conf.render(expected)
    assert setup.reload_count() == 4
    assert await _call(client, "DELETE", "/v1/config/http/access_log") == (204, "")
    del expected["http"]["access_log"]
    assert setup.store_path.read_bytes() == pretty(expected)
    assert (setup.work / "nginx.conf.bak").read_text() == nginx_conf.render(
        {**expected, "http": {"access_log": "off", **expected["http"]}})


async def test_post_merges_objects_and_refuses_scalars(client: Client, setup: Setup) -> None:
    status, body = await _call(client, "POST", "/v1/config/http", {"gzip": True})
    assert status == 200 and json.loads(body)["gzip"] is True
    assert await _call(client, "POST", "/v1/config/pid", "x") == (
        405, "POST '/pid': the value there is a string; POST merges into objects and appends "
             "to arrays: use PUT to replace it\n")
    assert await _call(client, "GET", "/v1/config/nope") == (404, "no key 'nope' at '/nope'\n")


async def test_invalid_change_reaches_neither_store_nor_target(client: Client,
                                                               setup: Setup) -> None:
    store_before, target_before = setup.store_path.read_bytes(), setup.target.read_bytes()
    status, body = await _call(client, "PUT", "/v1/config/http/bogus_directive", 1)
    assert status == 400
    assert 'unknown directive "bogus_directive"' in body
    assert body.endswith("test failed\n(exit status 1)\n")
    assert setup.store_path.read_bytes() == store_before
    assert setup.target.read_bytes() == target_before
    assert setup.reload_count() == 1
    assert sorted(p.name for p in setup.work.iterdir() if p.name.endswith(".staged")) == []


async def test_bad_json_and_other_methods(client: Client) -> None:
    status, body = await _call(client, "PUT", "/v1/config/x", raw=b"{nope")
    assert (status, body) == (400, "Bad request: the body is not JSON (Expecting property "
                                   "name enclosed in double quotes: line 1 column 2 (char 1))\n")
    assert (await _call(client, "PUT", "/v1/config/x", raw=b""))[0] == 400
    assert (await _call(client, "OPTIONS", "/v1/config/x"))[0] == 405
    assert (await _call(client, "DELETE", "/v1/render"))[0] == 405


async def test_patch(client: Client, setup: Setup) -> None:
    patch = [{"op": "test", "path": "/http/access_log", "value": "off"},
             {"op": "add", "path": "/http/gzip", "value": True},
             {"op": "replace", "path": "/http/server/listen", "value": "127.0.0.1:18081"}]
    status, body = await _call(client, "PATCH", "/v1/config", patch)
    assert status == 200
    assert json.loads(body)["http"]["server"]["listen"] == "127.0.0.1:18081"
    assert "gzip on;" in setup.target.read_text()
    status, body = await _call(client, "PATCH", "/v1/config", [
        {"op": "test", "path": "/http/access_log", "value": "on"}])
    assert (status, body) == (409, "operation 0 (test '/http/access_log'): test failed: "
                                   "'/http/access_log' is 'off', not 'on'\n")
    status, body = await _call(client, "PATCH", "/v1/config", {"op": "add"})
    assert status == 400 and body.startswith("Bad request: a JSON Patch is an array")
    assert (await _call(client, "PATCH", "/v1/config/http", []))[0] == 400


async def test_render_dry_run_changes_nothing(client: Client, setup: Setup) -> None:
    store_before, target_before = setup.store_path.read_bytes(), setup.target.read_bytes()
    candidate = {**initial(setup.work), "worker_processes": 2}
    status, body = await _call(client, "POST", "/v1/render", candidate)
    assert (status, body) == (200, nginx_conf.render(candidate))
    status, body = await _call(client, "POST", "/v1/render", {"events": {}, "bogus": 1})
    assert status == 400 and 'unknown directive "bogus"' in body
    status, body = await _call(client, "POST", "/v1/render", {"events": {"$value": "x"}})
    assert (status, body) == (400, 'Bad request: {"$value": "x"}: no value at that path; add '
                                   'a "default"\n')
    assert await _call(client, "POST", "/v1/render") == (200, target_before.decode())
    assert setup.store_path.read_bytes() == store_before
    assert setup.target.read_bytes() == target_before
    assert setup.reload_count() == 1


async def test_identical_output_is_not_written_or_reloaded(client: Client,
                                                           setup: Setup) -> None:
    target_stat = setup.target.stat()
    status, _ = await _call(client, "PUT", "/v1/config/http/server/listen", "127.0.0.1:18080")
    assert status == 200
    assert setup.target.stat().st_ino == target_stat.st_ino  # not even replaced
    assert setup.reload_count() == 1


async def test_services_without_a_registry_is_503(client: Client) -> None:
    status, body = await _call(client, "PUT", "/v1/config/http/upstream%20u",
                               {"server": {"$services": "web"}})
    assert (status, body) == (503, "$services 'web': this configurator has no registry "
                                   "(pass --registry)\n")


# -- found by make fuzz -----------------------------------------------------------------


async def test_documents_nested_too_deeply_are_400_and_change_nothing(client: Client,
                                                                       setup: Setup) -> None:
    """Past 64 levels of arrays and objects the body, or the document an edit would
    make, is refused with a message (a RecursionError and a 500 before)."""
    store_before, target_before = setup.store_path.read_bytes(), setup.target.read_bytes()
    too_deep = "nests arrays and objects more than 64 levels deep: flatten it\n"
    for depth in (65, 100_000):
        raw = b"[" * depth + b"]" * depth
        assert await _call(client, "PUT", "/v1/config/x", raw=raw) == (
            400, "Bad request: the body " + too_deep)
    assert await _call(client, "PUT", "/v1/config/" + "/".join(["k"] * 65), 1) == (
        400, "Bad request: the document " + too_deep)
    assert setup.store_path.read_bytes() == store_before
    assert setup.target.read_bytes() == target_before


async def test_a_template_index_of_other_digits_is_400(client: Client) -> None:
    assert await _call(client, "GET", "/v1/render?template=፩") == (
        400, "Bad request: template '፩': use 0 to 0\n")
