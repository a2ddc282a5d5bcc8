"""docs/protocol.md against proto/: the wire reference names every message, field, subject and
key that proto/ defines, and its worked examples are what the code produces.

Pure: reads the doc and imports proto/ (and the placement function the doc gives reference
values for); no NATS, no etcd. A message, field, subject or key added to proto/ without a
word in the doc fails here, naming it.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import msgspec
import pytest

import proto
from proto import client as proto_client
from proto import discovery as proto_discovery
from proto import generate as proto_generate
from proto import keys, subjects
from proto import kv as proto_kv
from proto import offload as proto_offload
from proto import planner as proto_planner
from proto import routing as proto_routing
from proto import transfer as proto_transfer

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
DOC = DOC_PATH.read_text()

MODULES = (proto_client, proto_discovery, proto_generate, proto_kv, proto_offload,
           proto_planner, proto_routing, proto_transfer)


def _structs() -> list[type]:
    """Every msgspec Struct a proto module defines (top-level messages and nested maps)."""
    out = []
    for mod in MODULES:
        for _name, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, msgspec.Struct) and cls.__module__ == mod.__name__:
                out.append(cls)
    return out


STRUCTS = _structs()


def _code_words(doc: str) -> set[str]:
    """Identifiers inside the doc's inline code spans and code blocks."""
    # an inline span may wrap lines, never a paragraph
    spans = re.findall(r"```.*?```|``.+?``|`(?:[^`\n]|\n(?!\n))+`", doc, re.S)
    return {w for span in spans for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}


CODE_WORDS = _code_words(DOC)


def _named(name: str, doc: str = DOC, code_words: set[str] | None = None) -> bool:
    """A CamelCase name with two capitals or more (`OffloadPutPart`) counts anywhere as a
    whole word; a one-capital name (`Stored`, `Usage`, a plain English word too) only in
    code."""
    words = CODE_WORDS if code_words is None else code_words
    if name in words:
        return True
    return sum(c.isupper() for c in name) >= 2 and re.search(rf"\b{name}\b", doc) is not None


def test_the_module_list_covers_every_proto_module_with_structs():
    # a new proto module with messages must be added to MODULES (else it is never checked)
    here = {m.__name__ for m in MODULES}
    for path in sorted((DOC_PATH.parent.parent / "proto").glob("*.py")):
        name = f"proto.{path.stem}"
        text = path.read_text()
        if name not in here and name != "proto.base" and "msgspec.Struct" in text:
            pytest.fail(f"{name} defines Structs but tests/test_protocol_doc.py does not check it")


def test_every_offload_message_is_among_the_checked_structs():
    names = {c.__name__ for c in STRUCTS}
    for cls in (*proto_offload.OFFLOAD_MESSAGES, proto_offload.OffloadBlock,
                proto_offload.OffloadBlockRef, proto_offload.TierSnapshot):
        assert cls.__name__ in names


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: c.__name__)
def test_every_struct_is_named_in_the_doc(cls):
    assert _named(cls.__name__), f"docs/protocol.md never names {cls.__name__} ({cls.__module__})"


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: c.__name__)
def test_every_field_is_named_in_the_doc(cls):
    missing = [f for f in cls.__struct_fields__ if f not in CODE_WORDS]
    assert not missing, (f"docs/protocol.md never names field(s) {missing} of {cls.__name__} "
                         "(in backticks)")


def _subject_builders() -> list:
    # not subject builders: the generic one, token helpers, a parser
    skip = {"subject", "instance_token", "sender_token"}
    return [f for name, f in inspect.getmembers(subjects, inspect.isfunction)
            if f.__module__ == subjects.__name__ and not name.startswith("_") and name not in skip]


def _call(f, **by_name):
    args = {}
    for p in inspect.signature(f).parameters.values():
        if p.name == "namespace":
            args[p.name] = "NSX"
        elif p.name in by_name:
            args[p.name] = by_name[p.name]
        elif p.annotation in (int, "int"):
            args[p.name] = 0xABC
        else:
            args[p.name] = "TOKX"
    return f(**args)


@pytest.mark.parametrize("builder", _subject_builders(), ids=lambda f: f.__name__)
def test_every_subject_is_in_the_doc(builder):
    # a worker's generate subject is named after its role: the doc writes `<role>`
    subject = _call(builder, component="ROLEX")
    parts = subject.split(".")
    assert parts[:2] == ["genset", "NSX"], subject
    stem = ".".join(["genset", "<ns>", *parts[2:4]]).replace("ROLEX", "<role>")
    assert f"`{stem}." in DOC or f"`{stem}`" in DOC, (
        f"docs/protocol.md has no subject `{stem}…` ({builder.__name__})")


def _key_builders() -> list:
    skip = {"model_name_from_key"}
    return [f for name, f in inspect.getmembers(keys, inspect.isfunction)
            if f.__module__ == keys.__name__ and not name.startswith("_") and name not in skip]


@pytest.mark.parametrize("builder", _key_builders(), ids=lambda f: f.__name__)
def test_every_key_is_in_the_doc(builder):
    key = _call(builder, component="COMPX", model_name="MODELX", model="MODELX",
                instance_id=0xABC, store_id=0xABC)
    key = key.replace("genset/NSX/", "genset/<ns>/")
    for placeholder in ("COMPX", "MODELX", "abc"):  # cut where the doc writes a placeholder
        cut = key.find(placeholder)
        if cut >= 0:
            key = key[:cut]
    assert f"`{key}" in DOC, f"docs/protocol.md has no etcd key `{key}…` ({builder.__name__})"


def test_the_frame_example_is_what_genset_encodes():
    """The 'Frames' example: its bytes, and the byte count the text gives."""
    m = re.search(r"is these (\d+) bytes:\n\n```\n(.*?)```", DOC, re.S)
    assert m, "the StreamChunk example is gone from docs/protocol.md"
    shown = bytes.fromhex(m.group(2).replace("\n", " "))
    encoded = proto.encode(proto.StreamChunk(seq=3, token_ids=proto.pack_tokens([791, 6460])))
    assert shown == encoded, f"docs/protocol.md shows {shown.hex(' ')}, genset encodes {encoded.hex(' ')}"
    assert int(m.group(1)) == len(encoded)


def test_the_placement_reference_values():
    from genset.offload.placement import Placement, mix64

    m = re.search(r"`mix64\(1\) =\s+(\d+)`", DOC)
    assert m and int(m.group(1)) == mix64(1)
    ids = re.search(r"among\s+the\s+ids\s+`(0x[0-9a-f]+)`,\s+`(0x[0-9a-f]+)`,\s+"
                    r"`(0x[0-9a-f]+)`", DOC)
    assert ids, "the placement reference values are gone from docs/protocol.md"
    placement = Placement(int(x, 16) for x in ids.groups())
    claims = re.findall(r"block\s+`(\d+)`\s+is\s+owned\s+by\s+`(0x[0-9a-f]+)`"
                        r"|block\s+`(\d+)`\s+by\s+`(0x[0-9a-f]+)`", DOC)
    pairs = [(int(a or c), int(b or d, 16)) for a, b, c, d in claims]
    assert len(pairs) >= 3
    for block, owner in pairs:
        assert placement.owner(block) == owner, (block, hex(owner))


def test_the_check_catches_a_message_missing_from_the_doc():
    """The name check itself can fail: a doc without `OffloadPutPart` (or a field of it)."""
    doc = DOC.replace("OffloadPutPart", "SomethingElse")
    assert not _named("OffloadPutPart", doc, _code_words(doc))
    doc = DOC.replace("max_large_bytes", "other_bytes")
    assert "max_large_bytes" not in _code_words(doc)
