"""The OpenAPI document against the running server: requests generated from it find no 5xx
and no answer that differs from the document (status, content type, body, headers)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import requests

from domain.commands import COMMAND_TYPES

ST = str(Path(sys.executable).with_name("st"))
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance,unsupported_method")


def test_generated_requests_find_no_server_error_and_no_mismatch(server, tmp_path):
    # the coverage phase (every schema's boundary values, some 6,000 requests) checks the
    # API's validation, which is the same on both databases: it runs on PostgreSQL, where
    # stored values meet the stricter types; SQLite gets five times the generated requests
    phases = (["--max-examples", "5"] if server.database.startswith("postgresql")
              else ["--max-examples", "25", "--phases", "examples,fuzzing,stateful"])
    try:
        run = subprocess.run(
            [ST, "run", f"{server.url}/openapi.json", "--checks", CHECKS, *phases,
             "--seed", "20261126",
             "-H", f"Authorization: Bearer {server.tokens['admin']}"],
            check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
    finally:
        unlock(server)  # the generated requests may have locked the shared database
    assert run.returncode == 0, run.stdout[:8000]


def unlock(server) -> None:
    from infrastructure.readside.queries import database_lock_state
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for

    t = bootstrap(settings_for(server.database))
    try:
        if database_lock_state(t) is not None:
            t.bus.dispatch_trial("UnlockDatabase", command_id=str(uuid.uuid4()),
                                 actor="test-openapi", reason="locked by generated requests")
    finally:
        t.close()


def test_the_document_names_every_path_and_command_of_the_contract(server):
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert set(document["paths"]) >= {
        "/v1/commands", "/v1/commands/batch", "/v1/participants",
        "/v1/participants/{participant_id}", "/v1/participants/{participant_id}/history",
        "/v1/deviations", "/v1/visits/due", "/v1/trial/summary", "/v1/audit/verify",
        "/healthz"}
    schemas = document["components"]["schemas"]
    choices = {ref["$ref"].rsplit("/", 1)[1] for ref in schemas["Command"]["oneOf"]}
    assert choices == {f"{name}Command" for name in COMMAND_TYPES}
    screen = schemas["ScreenParticipantCommand"]
    assert set(screen["required"]) == {"command_id", "type", "participant_id", "data"}
    assert schemas["ScreenParticipantData"]["properties"]["site_id"]["enum"] == ["CASE",
                                                                                 "METRO"]
    state = schemas["ParticipantState"]["properties"]
    assert {"status", "arm", "version", "site_id", "visits", "open_deviations",
            "scores"} <= set(state)
