"""The OpenAPI description of the server's HTTP routes, served at ``GET /v1/openapi.json``.

Kluis speaks its protocol over one WebSocket; HTTP is only the upgrade to it, a health check,
this document, and the transfer of attachments' ciphertext with a ticket from the WebSocket. The frames themselves are described in ``protocol/frames.py``, not here: OpenAPI
has no way to describe messages inside a WebSocket. API fuzzing (schemathesis) runs against this
description, so it must stay accurate: a route added to ``app.py`` belongs here too.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from kluis import __version__
from kluis.server.config import Limits

_TEXT_ERROR = {"text/plain": {"schema": {"type": "string"}}}


def _header(name: str, description: str, enum: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if enum:
        schema["enum"] = enum
    return {
        "name": name,
        "in": "header",
        "required": True,
        "description": description,
        "schema": schema,
    }


_JSON_ERROR = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    }
}
_BLOB_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The blob's ID from its ticket (32 lowercase hex characters)",
    "schema": {"type": "string"},
}
_TICKET = {
    "name": "Authorization",
    "in": "header",
    "required": True,
    "description": "'Bearer TICKET', a single-use ticket from a BlobTicket frame on /v1/ws",
    "schema": {"type": "string"},
}
_REFUSALS = {
    "401": {"description": "No valid ticket for this blob and direction", "content": _JSON_ERROR},
    "404": {"description": "The blob is gone (fetched by all, or expired)", "content": _JSON_ERROR},
    "503": {
        "description": "Several nodes: the attachment ledger (Redis) does not answer; try again",
        "content": _JSON_ERROR,
    },
}
_BLOBS: dict[str, Any] = {
    "put": {
        "operationId": "uploadBlob",
        "summary": "Upload an attachment's ciphertext, exactly the size the ticket was for",
        "parameters": [_BLOB_ID, _TICKET],
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        },
        "responses": {
            "201": {
                "description": "Stored",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["id", "size"],
                            "properties": {
                                "id": {"type": "string"},
                                "size": {"type": "integer"},
                            },
                        }
                    }
                },
            },
            "400": {
                "description": "The body is shorter than the ticket's size, or not HTTP",
                "content": {**_JSON_ERROR, **_TEXT_ERROR},
            },
            **_REFUSALS,
            "408": {"description": "Too slow; the connection is cut", "content": _JSON_ERROR},
            "413": {"description": "Longer than the ticket's size", "content": _JSON_ERROR},
        },
    },
    "get": {
        "operationId": "downloadBlob",
        "summary": "Download an attachment's ciphertext",
        "parameters": [_BLOB_ID, _TICKET],
        "responses": {
            "200": {
                "description": "The ciphertext",
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            },
            **_REFUSALS,
        },
    },
}


def _liveness(operation: str, summary: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation,
            "summary": summary,
            "responses": {
                "200": {
                    "description": "The server is up",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["status"],
                                "properties": {"status": {"type": "string", "enum": ["ok"]}},
                                "additionalProperties": False,
                            }
                        }
                    },
                }
            },
        }
    }


_READINESS: dict[str, Any] = {
    "get": {
        "operationId": "readyz",
        "summary": "Readiness: the store (and Redis, when used) answer in time",
        "responses": {
            "200": {
                "description": "Ready to serve",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"type": "string", "enum": ["ready"]}},
                            "additionalProperties": False,
                        }
                    }
                },
            },
            "503": {
                "description": "A part failed its check: take the node out of rotation",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["status", "code", "message", "failed"],
                            "properties": {
                                "status": {"type": "string", "enum": ["unavailable"]},
                                "code": {"type": "string", "enum": ["not_ready"]},
                                "message": {"type": "string"},
                                "failed": {
                                    "type": "object",
                                    "additionalProperties": {
                                        "type": "string",
                                        "enum": ["timeout", "error"],
                                    },
                                },
                            },
                            "additionalProperties": False,
                        }
                    }
                },
            },
        },
    }
}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Kluis server",
        "version": __version__,
        "description": (
            "End-to-end encrypted messaging. Everything but the health checks happens in "
            "binary msgpack frames over the WebSocket at /v1/ws (see protocol/frames.py)."
        ),
    },
    "paths": {
        "/health": _liveness("health", "Liveness only (the first name of /healthz)"),
        "/healthz": _liveness("healthz", "Liveness only: up, or no answer"),
        "/readyz": _READINESS,
        "/v1/ws": {
            "get": {
                "operationId": "websocket",
                "summary": "Upgrade to the Kluis protocol (RFC 6455 WebSocket)",
                "description": (
                    "The server sends a Challenge frame first and closes a connection that has "
                    "not authenticated within the auth timeout (the limit auth_timeout_s, "
                    f"{Limits().auth_timeout_s:g} s unless the operator sets it)."
                ),
                "parameters": [
                    _header("Upgrade", "Must be 'websocket'", ["websocket"]),
                    _header("Connection", "Must be 'Upgrade'", ["Upgrade"]),
                    _header("Sec-WebSocket-Version", "Must be '13'", ["13"]),
                    _header("Sec-WebSocket-Key", "base64 of 16 random bytes"),
                ],
                "responses": {
                    "101": {"description": "Switching to the WebSocket protocol"},
                    "400": {
                        "description": "Not a valid WebSocket handshake",
                        "content": _TEXT_ERROR,
                    },
                },
            }
        },
        "/v1/blobs/{id}": _BLOBS,
        "/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "The OpenAPI description of the HTTP routes",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    },
}


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(SPEC)
