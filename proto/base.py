"""Base class of every top-level wire message."""

from __future__ import annotations

import msgspec

from proto.version import PROTOCOL_MAJOR


class Message(msgspec.Struct, kw_only=True, omit_defaults=False):
    """A top-level message: a msgpack map with a protocol major version `v`.

    Decoding a message whose `v` is another major version fails validation (msgspec calls
    __post_init__ after decoding, and a ValueError there becomes a ValidationError).
    """

    v: int = PROTOCOL_MAJOR

    def __post_init__(self) -> None:
        if self.v != PROTOCOL_MAJOR:
            raise ValueError(
                f"unsupported protocol major version {self.v} "
                f"(this side speaks {PROTOCOL_MAJOR}) - at `$.v`"
            )
