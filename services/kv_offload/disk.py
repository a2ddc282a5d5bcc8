"""The disk tier's files: one file per block under one directory, each with a checksum.

Layout (`<dir>` is one store's directory; the service claims `<--offload-dir>/store-<k>`, the
first one no running store holds, see `DiskStore.claim`): `<dir>/store_id` (this store's instance id, hex: a restarted store keeps its hash
range and its place in routers' indexes), `<dir>/lock` (held with flock while a store runs:
two stores on one directory are refused), `<dir>/blocks/<2 hex>/<16 hex>.kvb`, one file per
block named by its hash, in 256 subdirectories so no directory grows huge.

A block file: a 40-byte little-endian header

    magic "GSOB" | version u8 | flags u8 (bit 0: has parent) | 0 u16 |
    hash u64 | parent_hash u64 | token bytes u32 | data bytes u32 | checksum u64

then the token ids (packed int32 LE) and the K/V payload. The checksum is XXH3-64 of the
first 32 header bytes, the tokens and the payload.

Writes go to `<name>.tmp` and are renamed into place (atomic on POSIX), so a reader sees a
whole file or none. There is no fsync per block (it would cost a disk flush per block, several
ms on ordinary disks): after a power loss a renamed file may be short or hold zeros, and the
checksum catches that. Start-up (`scan`) rebuilds the index from the files: leftover `.tmp`
files, files shorter or longer than their header says, bad headers and names that do not
match the header's hash are deleted and counted; with `verify=True` every checksum is checked
too (reads the whole tier). Every read checks the checksum whatever `verify` was, so a
corrupted file is dropped and counted, never served.

Not async: the store calls these methods from worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
import xxhash

from genset.runtime.logging import LogThrottle

log = structlog.get_logger("genset.kv_offload")

MAGIC = b"GSOB"
VERSION = 1
_HEADER = struct.Struct("<4sBBHQQII")  # 32 bytes, then the u64 checksum
_CHECK = struct.Struct("<Q")
HEADER_SIZE = _HEADER.size + _CHECK.size  # 40
SUFFIX = ".kvb"
PAGE = 4096  # disk usage is counted in whole filesystem pages

# Why a file was dropped, as counted (and labelled in genset_offload_disk_bad_files_total).
BAD_TRUNCATED = "truncated"  # shorter or longer than its header says
BAD_CHECKSUM = "checksum"  # contents do not match the checksum
BAD_HEADER = "header"  # not a block file, unknown version, or a name/hash mismatch
BAD_PARTIAL = "partial_write"  # a .tmp file a crashed write left behind
# a file an earlier run left whose KV values the store refuses (a NaN or an infinity, or a
# payload contradicting its own header: `genset.offload.payload`), found at its first read
BAD_VALUES = "kv_values"
BAD_REASONS = (BAD_TRUNCATED, BAD_CHECKSUM, BAD_HEADER, BAD_PARTIAL, BAD_VALUES)
# A failing disk fails every read, write and delete: its warnings are logged once per this
# many seconds at most, each line with the count of failures it stands for (`LogThrottle`).
DISK_WARN_EVERY_S = 5.0
READ_FAILED = "disk tier reads failing"


class DiskError(OSError):
    """The disk tier cannot be used (directory, lock, store id); the message says why."""


class DiskBusy(DiskError):
    """Another running store holds the directory."""


class BadBlockFile(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class BlockFile:
    hash: int
    parent_hash: int | None
    token_ids: bytes
    data: bytes


@dataclass(slots=True)
class ScannedFile:
    hash: int
    parent_hash: int | None
    size: int  # disk usage in bytes (whole pages)
    mtime: float
    token_bytes: int = 0  # its token ids' (0: put without them, its hash never checked)


def disk_usage(token_bytes: int, data_bytes: int) -> int:
    """What a block's file occupies, counted in whole pages."""
    n = HEADER_SIZE + token_bytes + data_bytes
    return -(-n // PAGE) * PAGE


def encode_block(block_hash: int, parent_hash: int | None, token_ids: bytes,
                 data: bytes) -> list[bytes]:
    """The file's contents, as pieces to write in order (no copy of the payload)."""
    head = _HEADER.pack(MAGIC, VERSION, 1 if parent_hash is not None else 0, 0, block_hash,
                        parent_hash or 0, len(token_ids), len(data))
    h = xxhash.xxh3_64()
    h.update(head)
    h.update(token_ids)
    h.update(data)
    return [head, _CHECK.pack(h.intdigest()), token_ids, data]


def decode_block(raw: bytes, block_hash: int | None = None) -> BlockFile:
    """Parse and check a whole file's contents; raises BadBlockFile."""
    (h, parent), checksum, tl, dl = _parse_header(raw[:HEADER_SIZE], len(raw), block_hash)
    mv = memoryview(raw)
    digest = xxhash.xxh3_64()
    digest.update(mv[: _HEADER.size])
    digest.update(mv[HEADER_SIZE:])
    if digest.intdigest() != checksum:
        raise BadBlockFile(BAD_CHECKSUM, "checksum mismatch")
    tokens = bytes(mv[HEADER_SIZE : HEADER_SIZE + tl])
    data = bytes(mv[HEADER_SIZE + tl : HEADER_SIZE + tl + dl])
    return BlockFile(h, parent, tokens, data)


def _parse_header(head: bytes, file_size: int, expect_hash: int | None):
    if len(head) < HEADER_SIZE:
        raise BadBlockFile(BAD_TRUNCATED, f"{file_size} bytes, shorter than a header")
    magic, version, flags, _, h, parent, tl, dl = _HEADER.unpack_from(head)
    (checksum,) = _CHECK.unpack_from(head, _HEADER.size)
    if magic != MAGIC or version != VERSION:
        raise BadBlockFile(BAD_HEADER, f"not a version-{VERSION} block file")
    if expect_hash is not None and h != expect_hash:
        raise BadBlockFile(BAD_HEADER, f"holds block {h:016x}, not {expect_hash:016x}")
    if HEADER_SIZE + tl + dl != file_size:
        raise BadBlockFile(BAD_TRUNCATED,
                           f"{file_size} bytes, header says {HEADER_SIZE + tl + dl}")
    return (h, parent if flags & 1 else None), checksum, tl, dl


class DiskStore:
    """The files of one disk tier. Thread-safe for one writer thread plus any readers."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.blocks_dir = self.root / "blocks"
        self.bad_files: dict[str, int] = dict.fromkeys(BAD_REASONS, 0)
        self.write_errors = 0
        self._lock_fd: int | None = None
        self._count_lock = threading.Lock()
        self.read_warn = LogThrottle(DISK_WARN_EVERY_S)

    # ---- identity and exclusivity ------------------------------------------------------------
    def store_id(self) -> int:
        """This directory's store id, created on first use."""
        path = self.root / "store_id"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                text = path.read_text().strip()
                try:
                    value = int(text, 16)
                except ValueError:
                    raise DiskError(f"{path} holds {text[:40]!r}, not a hex store id") from None
                if not 0 < value < 2**63:
                    raise DiskError(f"{path} holds {text!r}, out of range") from None
                return value
            value = random.getrandbits(63) or 1
            with os.fdopen(fd, "w") as f:
                f.write(f"{value:x}\n")
            return value
        except OSError as exc:
            raise DiskError(f"offload dir {self.root}: {exc.strerror or exc}") from None

    def lock(self) -> None:
        """Hold the directory for this process (again: no-op); DiskBusy if another store has
        it."""
        if self._lock_fd is not None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DiskError(f"offload dir {self.root}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DiskBusy(f"offload dir {self.root} is in use by another store "
                           "(one directory per store process)") from None
        self._lock_fd = fd
        try:
            for i in range(256):
                (self.blocks_dir / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # (a file named `blocks`, a folder this user may not write): a DiskError the
            # service reports by name, not a traceback out of its constructor
            self.close()
            raise DiskError(f"offload dir {self.root}: {exc.filename}: "
                            f"{exc.strerror or exc}") from None

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None

    @classmethod
    def claim(cls, root: str | os.PathLike, max_slots: int = 64) -> DiskStore:
        """The first `<root>/store-<k>` directory no running store holds, locked: replicas
        sharing one volume (compose --scale) each get their own, and a restarted store gets
        its old one back (its flock died with it), with its id and its files."""
        for k in range(max_slots):
            disk = cls(Path(root) / f"store-{k}")
            try:
                disk.lock()
            except DiskBusy:
                continue
            return disk
        raise DiskError(f"all {max_slots} store directories under {root} are in use")

    # ---- files ---------------------------------------------------------------------------------
    def path(self, block_hash: int) -> Path:
        name = f"{block_hash:016x}"
        return self.blocks_dir / name[:2] / (name + SUFFIX)

    def _bad(self, reason: str, path: Path) -> None:
        with self._count_lock:
            self.bad_files[reason] += 1
        with contextlib.suppress(OSError):
            path.unlink()

    def write(self, block_hash: int, parent_hash: int | None, token_ids: bytes,
              data: bytes) -> bool:
        """Write one block (atomically replacing any old file); False on an I/O error (disk
        full, permissions): the caller forgets the block."""
        final = self.path(block_hash)
        tmp = final.with_name(final.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.writelines(encode_block(block_hash, parent_hash, token_ids, data))
            os.replace(tmp, final)
            return True
        except OSError as exc:
            with self._count_lock:
                self.write_errors += 1
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            return False

    def delete(self, block_hash: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(block_hash).unlink()

    def drop_bad(self, block_hash: int, reason: str) -> None:
        """Delete a block's file the caller found bad after reading it, counted under
        `reason` (one of BAD_REASONS)."""
        self._bad(reason, self.path(block_hash))

    def read(self, block_hash: int) -> BlockFile | None:
        """The block, checked; None when the file is gone, unreadable or bad (a bad one is
        deleted and counted in `bad_files`)."""
        path = self.path(block_hash)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            # EIO, EACCES, something else in its place: unreadable now. None, like a bad
            # file, so the lookup serves the run before it and the tier drops the block
            # (raised, it failed the whole lookup, and every later one through this block)
            if n := self.read_warn.hit():
                log.warning(READ_FAILED, failed=n, block=f"{block_hash:016x}", error=str(exc),
                            every_s=self.read_warn.every_s)
            return None
        try:
            return decode_block(raw, block_hash)
        except BadBlockFile as exc:
            self._bad(exc.reason, path)
            return None

    def scan(self, verify: bool = False) -> Iterator[ScannedFile]:
        """Every good block file, oldest first by modification time (the LRU order the tier
        is rebuilt in); bad ones are deleted and counted as they are met."""
        found: list[ScannedFile] = []
        if not self.blocks_dir.is_dir():
            return iter(found)
        for sub in sorted(self.blocks_dir.iterdir()):
            if not sub.is_dir():
                continue
            with os.scandir(sub) as it:
                for de in it:
                    f = self._scan_one(Path(de.path), de.name, verify)
                    if f is not None:
                        found.append(f)
        found.sort(key=lambda f: f.mtime)
        return iter(found)

    def _scan_one(self, path: Path, name: str, verify: bool) -> ScannedFile | None:
        if name.endswith(".tmp"):
            self._bad(BAD_PARTIAL, path)
            return None
        if not name.endswith(SUFFIX):
            return None  # not ours: leave it alone
        try:
            expect = int(name[: -len(SUFFIX)], 16)
        except ValueError:
            self._bad(BAD_HEADER, path)
            return None
        try:
            st = path.stat()
            with open(path, "rb") as f:
                raw = f.read() if verify else f.read(HEADER_SIZE)
        except OSError:
            return None  # vanished meanwhile
        try:
            if verify:
                blk = decode_block(raw, expect)
                return ScannedFile(blk.hash, blk.parent_hash,
                                   disk_usage(len(blk.token_ids), len(blk.data)), st.st_mtime,
                                   len(blk.token_ids))
            (h, parent), _, tl, dl = _parse_header(raw, st.st_size, expect)
        except BadBlockFile as exc:
            self._bad(exc.reason, path)
            return None
        return ScannedFile(h, parent, disk_usage(tl, dl), st.st_mtime, tl)
