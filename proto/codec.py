"""Encoding and validated decoding of wire messages."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from proto.version import PROTOCOL_MAJOR

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder] = {}


class ProtocolError(ValueError):
    """A message that cannot be accepted; the text names the bad field."""


def encode(message: Any) -> bytes:
    return _encoder.encode(message)


def decoder(message_type: type[T]) -> msgspec.msgpack.Decoder:
    dec = _decoders.get(message_type)
    if dec is None:
        dec = _decoders[message_type] = msgspec.msgpack.Decoder(message_type)
    return dec


def describe(exc: msgspec.ValidationError, data: bytes, message_type: type) -> str:
    """The text of a validation failure, naming the version when that is what failed."""
    text = str(exc)
    if text.endswith("at `$.v`"):
        try:
            got = msgspec.msgpack.decode(data).get("v")
        except Exception:  # only for the message text
            got = "?"
        text = (
            f"unsupported protocol major version {got} (this side speaks {PROTOCOL_MAJOR})"
            " - at `$.v`"
        )
    return f"invalid {message_type.__name__}: {text}"


def decode(data: bytes, message_type: type[T]) -> T:
    try:
        return decoder(message_type).decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(describe(exc, data, message_type)) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed {message_type.__name__} (not msgpack): {exc}") from None
    except RecursionError:  # arrays / maps nested past the interpreter's recursion limit (~1,000)
        raise ProtocolError(f"malformed {message_type.__name__}: nested too deeply") from None
