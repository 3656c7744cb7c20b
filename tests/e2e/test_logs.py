"""Structured JSON logs name the command and the participant of every request."""

from __future__ import annotations

import json
import time
import uuid

from tests.e2e import payloads as p


def logged(server, **match):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in server.log_lines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if all(entry.get(k) == v for k, v in match.items()):
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no log line with {match}")


def test_every_request_is_logged_as_json_with_command_and_participant(server):
    pid = p.participant_id()
    command_id = str(uuid.uuid4())
    body = {"command_id": command_id, "type": "ScreenParticipant", "participant_id": pid,
            "data": p.screening()}
    assert server.client("service").post("/v1/commands", body).status_code == 201
    entry = logged(server, message="request", command_id=command_id)
    assert entry["participant_id"] == pid
    assert (entry["status"], entry["method"], entry["path"]) == (201, "POST", "/v1/commands")
    assert entry["actor"] == server.names["service"]

    server.client("service").get(f"/v1/participants/{pid}/history")
    read = logged(server, message="request", path=f"/v1/participants/{pid}/history")
    assert read["participant_id"] == pid


def test_a_refused_command_is_logged_with_its_ids(server):
    pid = p.participant_id()
    command_id = str(uuid.uuid4())
    body = {"command_id": command_id, "type": "RecordConsent", "participant_id": pid,
            "data": p.CONSENT}
    assert server.client("service").post("/v1/commands", body).status_code == 404
    entry = logged(server, message="request", command_id=command_id)
    assert (entry["participant_id"], entry["status"]) == (pid, 404)
