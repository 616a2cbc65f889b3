"""``ak-cache``: look into the cache of this machine.

    ak-cache path              # where this GPU's namespace lives
    ak-cache list              # tuned entries: shape, kernel, times, winner
    ak-cache wanted            # misses waiting for ak-tune
    ak-cache clear [--yes]     # drop this GPU's namespace (entries and wanted table)

Bundles for shipping a cache (export / import / verify) are the next step of this tool.
"""

from __future__ import annotations

import argparse
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
    sub.add_parser("list", help="list tuned entries")
    sub.add_parser("wanted", help="list recorded misses")
    clear = sub.add_parser("clear", help="delete this GPU's entries and wanted table")
    clear.add_argument("--yes", action="store_true", help="do not ask")
    args = p.parse_args(argv)
    cache = KernelCache(args.cache_dir, device=default_device())
    if args.command == "path":
        print(cache.path)
    elif args.command == "list":
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


if __name__ == "__main__":
    sys.exit(main())
