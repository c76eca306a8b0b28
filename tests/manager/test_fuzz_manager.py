"""The manager's OpenAPI schema (FastAPI's) fuzzed with schemathesis against a real manager on
loopback: every answer is a documented status, never an undocumented 5xx, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis

from tests.support import ManagerProcess, check_fuzzed_answer, fuzz_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagerProcess, str]]:
    root = tmp_path_factory.mktemp("fuzz") / "manager"
    manager = ManagerProcess(root, auth="api_keys", node={"creation_wait_seconds": 60})
    manager.start()
    key = manager.create_key("fuzz", "admin", max_sessions=2, starts_per_minute=4)
    try:
        yield manager, key
        log = manager.log()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, manager.tail(60)
        with httpx.Client(base_url=manager.url, trust_env=False, timeout=60) as http:
            for record in manager.nodes():  # what the fuzzer started
                http.post(
                    f"/admin/sessions/{record['short_id']}/release",
                    headers={"Authorization": f"Bearer {key}"},
                )
    finally:
        assert not manager.cleanup()


def _schema() -> schemathesis.schemas.BaseSchema:
    """The schema the manager serves at /openapi.json (built here so that pytest can list its operations)."""
    from toolserver.manager.app import create_app
    from toolserver.manager.settings import load_settings

    return schemathesis.openapi.from_dict(create_app(load_settings(None, auth="api_keys")).openapi())


schema = _schema()


def test_the_schema_is_the_one_served(fuzzed_manager: tuple[ManagerProcess, str]) -> None:
    manager, key = fuzzed_manager
    served = httpx.get(
        manager.url + "/openapi.json", headers={"Authorization": f"Bearer {key}"}, trust_env=False
    )
    assert served.json() == schema.raw_schema


@schema.parametrize()
@fuzz_settings(15)
def test_the_manager_api_fuzzed(case: schemathesis.Case, fuzzed_manager: tuple[ManagerProcess, str]) -> None:
    manager, key = fuzzed_manager
    response = case.call(base_url=manager.url, headers={"Authorization": f"Bearer {key}"}, timeout=90)
    check_fuzzed_answer(case, response)
