"""Cache bundles: one file that carries tuned entries from one machine to another, intact.

Format (``.akc``): a gzip-compressed tar archive of plain files, at its top level only:

- ``manifest.json``: ``{"format": 1, "autokernel": version, "created": unix time, "entries": [{"fingerprint",
  "key", "file", "sha256"}, ...], "signature": hex or null}``;
- ``e<NNNN>.json``: one entry each, as JSON.

The signature is HMAC-SHA256, under a shared key (``AUTOKERNEL_SIGNING_KEY``), of the manifest's canonical
JSON without its ``signature`` field. Since the manifest pins each entry's sha256, a valid signature
vouches for every entry: whoever holds the key made (or approved) this exact bundle. A cache entry may
hold kernel source, which runs in the user's process: that is why import refuses unsigned bundles
whenever a key is set, unless told otherwise.

Import checks everything before it writes anything: member names (no paths, links or devices), sizes,
the manifest's shape, every entry's hash and shape, the signature. Merging keeps local entries; on a
conflict the entry with the faster measured time wins, and the report says so.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autokernel import __version__
from autokernel.cache.store import KernelCache, entry_problem

FORMAT = 1
MAX_MEMBER_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 256 * 2**20
MAX_MEMBERS = 100_000
_NAME = re.compile(r"^(manifest|e\d{4,9})\.json$")
_FINGERPRINT = re.compile(r"^[A-Za-z0-9.+_-]+$")


class BundleError(Exception):
    """The bundle is refused; the message names what was wrong. Nothing was written."""


@dataclass
class ImportReport:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # the bundle's entry was faster
    kept: list[str] = field(default_factory=list)  # the local entry was faster (or as fast)
    signed: bool = False


def _canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in manifest.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()


def _sign(manifest: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()


def signing_key(key_file: str | None = None) -> bytes | None:
    """The HMAC key: ``--key-file`` contents, else ``AUTOKERNEL_SIGNING_KEY``, else None."""
    if key_file:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as exc:
            raise BundleError(f"--key-file {key_file}: {exc.strerror or exc}") from None
        if not key:
            raise BundleError(f"--key-file {key_file} is empty")
        return key
    env = os.environ.get("AUTOKERNEL_SIGNING_KEY")
    return env.encode() if env else None


def _fingerprints(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "db").is_dir()) if root.is_dir() else []


def export_bundle(root: str | os.PathLike, out: str | os.PathLike, fingerprint: str | None = None,
                  key: bytes | None = None) -> dict[str, Any]:
    """Write every sound entry of ``root`` (or of one fingerprint) to ``out``; return the manifest."""
    root = Path(root)
    fps = [fingerprint] if fingerprint else _fingerprints(root)
    files: list[tuple[str, bytes]] = []
    listed = []
    for fp in fps:
        if not (root / fp / "db").is_dir():
            raise BundleError(f"no cache for fingerprint {fp!r} under {root}")
        cache = KernelCache(root, fingerprint_=fp)
        for key_, entry in sorted(cache.entries(), key=lambda kv: kv[0]):
            if entry_problem(entry):
                continue
            data = json.dumps(entry, sort_keys=True).encode()
            name = f"e{len(files):04d}.json"
            files.append((name, data))
            listed.append({"fingerprint": fp, "key": key_, "file": name, "sha256": hashlib.sha256(data).hexdigest()})
        cache.close()
    manifest: dict[str, Any] = {"format": FORMAT, "autokernel": __version__, "created": time.time(),
                                "entries": listed, "signature": None}
    if key:
        manifest["signature"] = _sign(manifest, key)
    tmp = Path(f"{out}.tmp")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for name, data in [("manifest.json", json.dumps(manifest, indent=1).encode()), *files]:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, out)
    except OSError as exc:  # a missing or read-only folder, a full disk: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write {out}: {exc.strerror or exc}") from None
    return manifest


def read_bundle(path: str | os.PathLike, key: bytes | None = None,
                allow_unsigned: bool = False) -> tuple[dict[str, Any], list[tuple[str, str, dict[str, Any]]]]:
    """Check a bundle completely; return its manifest and (fingerprint, key, entry) triples."""
    try:
        tar = tarfile.open(path, "r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"{path}: not a bundle (gzip tar expected): {exc}") from None
    blobs: dict[str, bytes] = {}
    total = 0
    with tar:
        for count, member in enumerate(tar):
            if count >= MAX_MEMBERS:
                raise BundleError(f"more than {MAX_MEMBERS} members")
            if not member.isfile():
                raise BundleError(f"member {member.name!r} is not a plain file (links and devices are refused)")
            if not _NAME.match(member.name):
                raise BundleError(f"member name {member.name!r} is not allowed (only manifest.json and eNNNN.json, "
                                  "no directories)")
            if member.size > MAX_MEMBER_BYTES:
                raise BundleError(f"member {member.name!r} has {member.size} bytes (limit {MAX_MEMBER_BYTES})")
            total += member.size
            if total > MAX_TOTAL_BYTES:
                raise BundleError(f"members add up to more than {MAX_TOTAL_BYTES} bytes")
            if member.name in blobs:
                raise BundleError(f"member {member.name!r} appears twice")
            blobs[member.name] = tar.extractfile(member).read()
    if "manifest.json" not in blobs:
        raise BundleError("no manifest.json")
    try:
        manifest = json.loads(blobs["manifest.json"])
    except ValueError as exc:
        raise BundleError(f"manifest.json is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("entries"), list):
        raise BundleError(f"manifest.json: format {manifest.get('format') if isinstance(manifest, dict) else '?'!r}"
                          f" with an entry list expected (this autokernel reads format {FORMAT})")
    signature = manifest.get("signature")
    if signature is not None and not isinstance(signature, str):
        raise BundleError("manifest.json: signature must be a hex string or null")
    if key is not None:
        if signature is None and not allow_unsigned:
            raise BundleError("the bundle is unsigned and a signing key is set (pass --allow-unsigned to accept it)")
        if signature is not None and not hmac.compare_digest(signature, _sign(manifest, key)):
            raise BundleError("the signature does not match this key: the bundle was altered or signed by another key")
    entries = []
    seen = set()
    for i, item in enumerate(manifest["entries"]):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str)
                                                 for k in ("fingerprint", "key", "file", "sha256")):
            raise BundleError(f"manifest entry {i} lacks fingerprint/key/file/sha256 strings")
        if not _FINGERPRINT.match(item["fingerprint"]):
            raise BundleError(f"manifest entry {i}: fingerprint {item['fingerprint']!r} is not a plain name")
        data = blobs.get(item["file"])
        if data is None:
            raise BundleError(f"manifest entry {i}: member {item['file']!r} is missing")
        if hashlib.sha256(data).hexdigest() != item["sha256"]:
            raise BundleError(f"member {item['file']!r}: sha256 differs from the manifest (tampered or corrupt)")
        try:
            entry = json.loads(data)
        except ValueError:
            raise BundleError(f"member {item['file']!r} is not JSON") from None
        problem = entry_problem(entry)
        if problem:
            raise BundleError(f"member {item['file']!r}: {problem}")
        expected = f"entry/{entry['pattern_key']}/H={entry['hidden']}/R={entry['row_bucket']}"
        if item["key"] != expected:
            raise BundleError(f"member {item['file']!r}: key {item['key']!r} does not match its entry ({expected})")
        if (item["fingerprint"], item["key"]) in seen:
            raise BundleError(f"entry {item['key']!r} appears twice for {item['fingerprint']}")
        seen.add((item["fingerprint"], item["key"]))
        entries.append((item["fingerprint"], item["key"], entry))
    return manifest, entries


def _speed(entry: dict[str, Any]) -> float:
    times = entry.get("times") or {}
    ms = times.get("train_ms") if times.get("train_ms") is not None else times.get("fwd_ms")
    return float(ms) if isinstance(ms, (int, float)) else float("inf")


def import_bundle(path: str | os.PathLike, root: str | os.PathLike, key: bytes | None = None,
                  allow_unsigned: bool = False) -> ImportReport:
    """Check ``path`` completely, then merge its entries into the cache at ``root``."""
    manifest, entries = read_bundle(path, key, allow_unsigned)
    report = ImportReport(signed=manifest.get("signature") is not None and key is not None)
    caches: dict[str, KernelCache] = {}
    for fp, key_, entry in entries:
        cache = caches.setdefault(fp, KernelCache(root, fingerprint_=fp))
        local = cache.db.get(key_)
        label = f"{fp}: {key_}"
        if local is None or entry_problem(local):
            report.added.append(label)
        elif _speed(entry) < _speed(local):
            report.replaced.append(label)
        else:
            report.kept.append(label)
            continue
        cache.put_entry(entry)
    for cache in caches.values():
        cache.close()
    return report
