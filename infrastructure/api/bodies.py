"""Request bodies read as JSON, strictly: UTF-8 text with no lone surrogate (``"\\ud800"``
decodes to no character any encoder can write, and one such command failed every command
committed with it), no NaN, nested at most 1,024 deep (orjson's rules). A body that breaks
them is a 400 ``malformed_json`` saying why and where, on every endpoint that takes one."""

from __future__ import annotations

from codecs import BOM_UTF8
from typing import Any

import orjson
from flask import Request, request
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import RequestEntityTooLarge

from infrastructure.api.errors import ApiError
from infrastructure.store.schemas import MAX_BODY, json_fault

TOO_LARGE = f"the body is larger than the server takes ({MAX_BODY // 2**20} MiB)"
NOT_JSON = "the body must be a JSON object, sent as Content-Type: application/json"


def malformed(error: orjson.JSONDecodeError) -> ApiError:
    return ApiError(400, "malformed_json", json_fault(error, "body"))


def json_body() -> Any:
    """The request's body, parsed (see the module's docstring)."""
    return _parsed(request)


def _parsed(req: Request) -> Any:
    if not req.is_json:
        raise ApiError(400, "malformed_json", NOT_JSON)
    data = req.get_data(cache=True)
    if req.content_length is None and len(data) >= MAX_BODY \
            and req.environ["wsgi.input"].read(1):
        # Sent chunked (no Content-Length), the body is read up to the limit and no further:
        # one byte more there, and it is larger (cut, it was refused as JSON that ends too
        # soon).
        raise RequestEntityTooLarge()
    data = data.removeprefix(BOM_UTF8)  # RFC 8259 lets a parser skip it
    if not data:
        raise ApiError(400, "malformed_json", NOT_JSON)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise malformed(e) from None


class BodyParser(FlaskParser):
    """flask-smorest's arguments of a blueprint, their JSON body parsed as ``json_body``
    parses it (webargs' own parser takes what orjson refuses, and answers a bare 400)."""

    def load_json(self, req: Request, schema: Any) -> Any:
        return _parsed(req)
