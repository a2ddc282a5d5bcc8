"""JSON Schema of every wire message: `python -m proto.schema [OUT.json]`."""

from __future__ import annotations

import json
import sys

import msgspec

from proto import MESSAGES, PROTOCOL_VERSION


def schema() -> dict:
    refs, components = msgspec.json.schema_components(MESSAGES, ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"genset wire protocol {PROTOCOL_VERSION}",
        "description": "MessagePack maps; `bytes` fields are msgpack bin (token ids: int32 LE).",
        "messages": {m.__name__: ref for m, ref in zip(MESSAGES, refs, strict=True)},
        "$defs": components,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = json.dumps(schema(), indent=2, sort_keys=True)
    if argv:
        with open(argv[0], "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
