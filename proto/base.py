"""Base class of every top-level wire message."""

from __future__ import annotations

from typing import Annotated

import msgspec

from proto.version import PROTOCOL_MAJOR

# Checked by msgspec's decoder itself (no Python call per message, which a __post_init__
# check cost on every frame of every stream); proto.codec turns the failure into a message
# that names the version.
MajorVersion = Annotated[
    int,
    msgspec.Meta(
        ge=PROTOCOL_MAJOR,
        le=PROTOCOL_MAJOR,
        description="protocol major version; a message of another major version is refused",
    ),
]


class Message(msgspec.Struct, kw_only=True, omit_defaults=False):
    """A top-level message: a msgpack map with a protocol major version `v`.

    Decoding a message whose `v` is another major version fails validation (see
    proto.codec.describe for the error text).
    """

    v: MajorVersion = PROTOCOL_MAJOR
