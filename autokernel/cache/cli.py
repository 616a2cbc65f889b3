"""``ak-cache``: look into the cache of this machine.

    ak-cache path              # where this GPU's namespace lives
    ak-cache list              # tuned entries: shape, kernel, times, winner
    ak-cache wanted            # misses waiting for ak-tune
    ak-cache clear [--yes]     # drop this GPU's namespace (entries and wanted table)
    ak-cache export -o bundle.akc [--gpu FINGERPRINT] [--sign] [--key-file F]
    ak-cache import bundle.akc [--allow-unsigned] [--key-file F]
    ak-cache verify [bundle.akc] [--key-file F]

Bundles are described in docs/cache.md; the signing key comes from --key-file or AUTOKERNEL_SIGNING_KEY.
"""

from __future__ import annotations

import argparse
import json
import sys

from autokernel.cache.fingerprint import default_device
from autokernel.cache.store import KernelCache, entry_problem


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ak-cache", description="Inspect the autokernel cache of this machine.")
    p.add_argument("--cache-dir", help="cache root (default $AUTOKERNEL_CACHE_DIR or ~/.cache/autokernel)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("path", help="print this GPU's namespace directory")
    ls = sub.add_parser("list", aliases=["ls"], help="list tuned entries")
    ls.add_argument("--json", action="store_true", help="one JSON object per entry")
    show = sub.add_parser("show", help="one entry whole: kernel, checks, times")
    show.add_argument("key", help="an entry key as `ak-cache list` prints it")
    rm = sub.add_parser("rm", help="delete entries")
    rm.add_argument("key", nargs="?", help="an entry key")
    rm.add_argument("--pattern", help="every entry of this pattern")
    prune = sub.add_parser("prune", help="drop this GPU's caches for other torch/triton versions, and losers")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="also drop entries older than this")
    sub.add_parser("wanted", help="list recorded misses")
    clear = sub.add_parser("clear", help="delete this GPU's entries and wanted table")
    clear.add_argument("--yes", action="store_true", help="do not ask")
    export = sub.add_parser("export", help="write the cache's entries to one bundle file")
    export.add_argument("-o", "--output", required=True, help="bundle file to write (e.g. bundle.akc)")
    export.add_argument("--gpu", help="only this fingerprint (default: every GPU in the cache)")
    export.add_argument("--sign", action="store_true", help="sign with HMAC-SHA256 (needs a key)")
    export.add_argument("--key-file", help="signing key file (default: $AUTOKERNEL_SIGNING_KEY)")
    imp = sub.add_parser("import", help="check a bundle, then merge it into the cache")
    imp.add_argument("bundle")
    imp.add_argument("--allow-unsigned", action="store_true", help="accept an unsigned bundle although a key is set")
    imp.add_argument("--key-file", help="signing key file (default: $AUTOKERNEL_SIGNING_KEY)")
    ver = sub.add_parser("verify", help="check a bundle's hashes and signature, or the local entries")
    ver.add_argument("bundle", nargs="?")
    ver.add_argument("--key-file", help="signing key file (default: $AUTOKERNEL_SIGNING_KEY)")
    args = p.parse_args(argv)
    if args.command in ("export", "import", "verify"):
        return _bundles(args)
    cache = KernelCache(args.cache_dir, device=default_device())
    if args.command == "path":
        print(cache.path)
    elif args.command in ("list", "ls") and args.json:
        for key, entry in cache.entries():
            print(json.dumps({"key": key, "usable": entry_problem(entry) is None,
                              **({k: v for k, v in entry.items() if k != "kernel"} if isinstance(entry, dict) else {}),
                              "kernel_kind": entry.get("kernel", {}).get("kind") if isinstance(entry, dict) else None}))
    elif args.command == "show":
        entry = cache.db.get(args.key)
        if entry is None:
            print(f"ak-cache show: no entry {args.key!r} in {cache.path}", file=sys.stderr)
            return 1
        print(json.dumps(entry, indent=1, sort_keys=True))
    elif args.command == "rm":
        if not args.key and not args.pattern:
            print("ak-cache rm: name a KEY or --pattern", file=sys.stderr)
            return 2
        doomed = [k for k, e in cache.entries()
                  if k == args.key or (args.pattern and isinstance(e, dict) and e.get("pattern") == args.pattern)]
        if not doomed:
            print(f"ak-cache rm: nothing matches in {cache.path}", file=sys.stderr)
            return 1
        for k in doomed:
            cache.delete_entry(k)
            print(f"removed {k}")
    elif args.command == "prune":
        _prune(cache, args.older_than)
    elif args.command in ("list", "ls"):
        print(f"entries in {cache.path}:")
        for key, entry in cache.entries():
            problem = entry_problem(entry)
            if problem:
                print(f"  {key}  UNUSABLE: {problem}")
                continue
            t = entry.get("times", {})
            print(f"  {key}  winner fwd={entry['winner']['fwd']} train={entry['winner']['train']}  "
                  f"fwd {_fmt(t.get('fwd_ms'))} ms (Inductor {_fmt(t.get('inductor_fwd_ms'))})  "
                  f"train {_fmt(t.get('train_ms'))} ms (Inductor {_fmt(t.get('inductor_train_ms'))})  "
                  f"raced={entry.get('raced')}  config={entry['kernel'].get('config')}")
    elif args.command == "wanted":
        print(f"wanted in {cache.path}:")
        for key, w in cache.wanted():
            print(f"  {key}  shape {'x'.join(map(str, w['shape']))}  seen {w['count']}x")
    elif args.command == "clear":
        if not args.yes and input(f"delete everything in {cache.path}? [y/N] ").strip().lower() != "y":
            print("nothing deleted")
            return 1
        cache.clear()
        print(f"cleared {cache.path}")
    cache.close()
    return 0


def _prune(cache: KernelCache, older_than_days: float | None) -> None:
    """Drop other torch/triton versions of this GPU (a whole namespace each: never served here), entries
    Inductor beats in both passes (those shapes become misses again, to be retuned, e.g. after an upgrade),
    and, when asked, entries older than ``older_than_days``."""
    import shutil
    import time

    device_part = cache.fingerprint.split("-torch")[0]
    for other in sorted(cache.root.iterdir()) if cache.root.is_dir() else []:
        if other.name != cache.fingerprint and other.name.split("-torch")[0] == device_part and (other / "db").is_dir():
            shutil.rmtree(other)
            print(f"removed {other} (another torch/triton version of this GPU)")
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    for key, entry in list(cache.entries()):
        if entry_problem(entry):
            continue
        if set(entry["winner"].values()) == {"inductor"}:
            why = "Inductor wins both passes"
        elif cutoff is not None and entry["created"] < cutoff:
            why = f"older than {older_than_days:g} days"
        else:
            continue
        cache.delete_entry(key)
        print(f"removed {key} ({why})")


def _bundles(args: argparse.Namespace) -> int:
    from autokernel.cache.bundle import BundleError, export_bundle, import_bundle, read_bundle, signing_key
    from autokernel.cache.store import default_cache_dir

    root = args.cache_dir or default_cache_dir()
    key = signing_key(args.key_file)
    try:
        if args.command == "export":
            if args.sign and key is None:
                print("ak-cache export --sign: no key (set AUTOKERNEL_SIGNING_KEY or pass --key-file)", file=sys.stderr)
                return 2
            manifest = export_bundle(root, args.output, args.gpu, key if args.sign else None)
            fps = sorted({e["fingerprint"] for e in manifest["entries"]})
            print(f"wrote {args.output}: {len(manifest['entries'])} entries for {fps or 'no GPU'}"
                  f"{', signed' if manifest['signature'] else ', unsigned'}")
        elif args.command == "import":
            report = import_bundle(args.bundle, root, key, args.allow_unsigned)
            print(f"imported {args.bundle} into {root} ({'signature verified' if report.signed else 'unsigned'}): "
                  f"{len(report.added)} added, {len(report.replaced)} replaced (bundle faster), "
                  f"{len(report.kept)} kept (local faster)")
            for label in report.added:
                print(f"  added     {label}")
            for label in report.replaced:
                print(f"  replaced  {label}")
            for label in report.kept:
                print(f"  kept      {label}")
        elif args.bundle:
            manifest, entries = read_bundle(args.bundle, key)
            state = "signature verified" if (manifest.get("signature") and key) else (
                "signed, no key to check it" if manifest.get("signature") else "unsigned")
            print(f"{args.bundle}: {len(entries)} entries, every hash matches, {state}")
        else:
            cache = KernelCache(args.cache_dir, device=default_device())
            bad = [(k, entry_problem(e)) for k, e in cache.entries() if entry_problem(e)]
            total = len(list(cache.entries()))
            print(f"{cache.path}: {total - len(bad)} of {total} entries usable")
            for k, problem in bad:
                print(f"  UNUSABLE {k}: {problem}")
            return 1 if bad else 0
    except BundleError as exc:
        print(f"ak-cache {args.command}: refused: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
