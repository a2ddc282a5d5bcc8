"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` + an HTTP status."""

from __future__ import annotations

import re

import msgspec

import proto

_FIELD_PATH = re.compile(r"at `\$\.?([^`]*)`")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ApiError(Exception):
    """A request that ends in an error reply; `status` is the HTTP status code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def to_error_info(self) -> proto.ErrorInfo:
        return proto.ErrorInfo(code=self.code or _CODE_BY_STATUS.get(self.status, "internal"),
                               message=self.message, retryable=self.status in (429, 503))


_CODE_BY_STATUS = {400: "bad_request", 404: "not_found", 408: "deadline_exceeded",
                   429: "overloaded", 503: "overloaded", 504: "deadline_exceeded"}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def field_of(message: str) -> str | None:
    """The request field a proto check's message names: the first name of its `- at `$.f``
    path, else of its first word, without an index or key suffix or punctuation
    ("logit_bias[5] must be ..." and "logit_bias: key 'x' ..." -> "logit_bias")."""
    match = _FIELD_PATH.search(message)
    head = match.group(1) if match and match.group(1) else message
    name = _FIELD_NAME.match(head.lstrip())
    return name.group(0) if name else None


def from_validation(exc: msgspec.ValidationError | ValueError) -> ApiError:
    """msgspec's message names the field path (`... - at `$.messages[0].role``)."""
    text = str(exc)
    match = _FIELD_PATH.search(text)
    param = match.group(1) if match else None
    return ApiError(400, f"invalid request body: {text}", param=param or None)


# How a failure reported by a worker / the bus maps to an HTTP status.
_STATUS_BY_CODE = {
    "bad_request": 400,
    "context_length_exceeded": 400,
    "not_found": 404,
    "overloaded": 503,
    "no_responders": 503,
    "no_worker": 503,
    "peer_gone": 503,  # the worker died and no other could take the request over
    "disconnected": 503,
    "lost_chunks": 503,
    "deadline_exceeded": 504,
    "cancelled": 499,
}


def from_error_info(info: proto.ErrorInfo, *, prefix: str = "") -> ApiError:
    status = _STATUS_BY_CODE.get(info.code, 500)
    kind = ("invalid_request_error" if status < 500 and status != 429 else
            "server_error" if status >= 500 and info.code != "overloaded" else "overloaded_error")
    return ApiError(status, prefix + info.message, type=kind, code=info.code)


def no_worker(model: str, detail: str = "") -> ApiError:
    msg = f"no worker available for model {model!r}" + (f": {detail}" if detail else "")
    return ApiError(503, msg, type="overloaded_error", code="no_worker")
