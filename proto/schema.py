"""JSON Schema of every wire message: `python -m proto.schema [OUT.json]`."""

from __future__ import annotations

import argparse
import json

import msgspec

from proto import MESSAGES, PROTOCOL_VERSION, TRANSFER_MESSAGES

# Every message on the wire: the bus's (MESSAGES) and the KV transfer's between workers, which
# also travel over TCP (proto.transfer); the remote-prefill pair is in both tuples.
SCHEMA_MESSAGES = tuple(dict.fromkeys((*MESSAGES, *TRANSFER_MESSAGES)))


def schema() -> dict:
    refs, components = msgspec.json.schema_components(SCHEMA_MESSAGES,
                                                      ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"genset wire protocol {PROTOCOL_VERSION}",
        "description": "MessagePack maps; `bytes` fields are msgpack bin (token ids: int32 LE).",
        "messages": {m.__name__: ref for m, ref in zip(SCHEMA_MESSAGES, refs, strict=True)},
        "$defs": components,
    }


def main(argv: list[str] | None = None, prog: str = "python -m proto.schema") -> int:
    """`prog`: the command as the user typed it (`genset schema` passes its own name: proto/
    imports nothing of ours, so it cannot look it up)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print the JSON Schema of every genset wire message, or write it to a file.")
    parser.add_argument("out", nargs="?", metavar="OUT.json",
                        help="file to write (default: print to stdout)")
    args = parser.parse_args(argv)
    text = json.dumps(schema(), indent=2, sort_keys=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
