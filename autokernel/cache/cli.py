"""``ak-cache``: look into the cache of this machine.

    ak-cache path              # where this GPU's namespace lives
    ak-cache list              # tuned entries: shape, kernel, times, winner
    ak-cache wanted            # misses waiting for ak-tune
    ak-cache clear [--yes]     # drop this GPU's namespace (entries and wanted table)
    ak-cache export -o bundle.akc [--gpu FINGERPRINT] [--sign] [--key-file F]
    ak-cache import bundle.akc [--allow-unsigned] [--key-file F]
    ak-cache verify [bundle.akc] [--key-file F]
    ak-cache verify --rerun [--drop-failed] [--json]   # recheck every local entry's kernel (and race it on a GPU)

Bundles are described in docs/cache.md; the signing key comes from --key-file or AUTOKERNEL_SIGNING_KEY.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from autokernel.cache.fingerprint import default_device
from autokernel.cache.store import CacheWriteError, KernelCache, entry_problem

# A served pass whose Inductor time is now this much faster than ours makes the entry stale: beyond the
# run-to-run noise of a median timing, so a re-race that merely wobbles does not flag a good entry.
STALE_MARGIN = 1.05


def positive(kind: type, what: str):
    """An argparse type: a number of ``kind`` above zero, else an error saying ``what`` it counts (argparse
    names the flag)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number of {what}, got {text!r}")
        return value
    return parse


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
    prune.add_argument("--older-than", type=positive(float, "days"), metavar="DAYS",
                       help="also drop entries older than this")
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
    ver.add_argument("--rerun", action="store_true",
                     help="rerun the correctness checks on every local entry of this GPU and, on a GPU, race it "
                          "against Inductor again")
    ver.add_argument("--drop-failed", action="store_true", help="with --rerun: delete failed and stale entries")
    ver.add_argument("--json", action="store_true", help="with --rerun: one JSON object per entry")
    ver.add_argument("--timeout", type=positive(float, "seconds"), default=180.0,
                     help="with --rerun on a GPU: seconds before a kernel counts as hung (default 180)")
    args = p.parse_args(argv)
    try:
        return _dispatch(args)
    except CacheWriteError as exc:  # a full or read-only disk: say so, no traceback
        print(f"ak-cache {args.command}: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "verify" and args.rerun:
        if args.bundle:
            print("ak-cache verify --rerun rechecks the local entries; it takes no bundle argument", file=sys.stderr)
            return 2
        return _rerun(args.cache_dir, args.drop_failed, args.json, args.timeout)
    if args.command == "verify" and (args.drop_failed or args.json):
        print("ak-cache verify: --drop-failed and --json go with --rerun", file=sys.stderr)
        return 2
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
            print(f"  {key}  shape {'x'.join(map(str, w['shape']))}  seen {w['count']}x"
                  + ("" if w.get("train", True) else "  (forward only: seen under no_grad/inference_mode)"))
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


def _rerun(cache_dir: str | None, drop_failed: bool, as_json: bool, timeout_s: float) -> int:
    """``verify --rerun``: recheck every entry of this GPU's namespace; non-zero when one failed."""
    from autokernel.cache.fingerprint import interpreter_enabled
    from autokernel.playbook.tuner import set_interpreter_if_no_gpu

    if not torch.cuda.is_available() and not interpreter_enabled():
        # ak-tune can choose the interpreter itself (its kernels run in a fresh worker); the checks here run
        # in this process, where triton.language was imported already: too late to switch it on.
        print("ak-cache verify --rerun: no CUDA device; run it with TRITON_INTERPRET=1 to recheck the "
              "interpreter's entries", file=sys.stderr)
        return 2
    device = set_interpreter_if_no_gpu()
    timed = device.type == "cuda"
    cache = KernelCache(cache_dir, device=device)
    entries = list(cache.entries())
    counts = {"ok": 0, "failed": 0, "stale": 0, "unusable": 0}
    dropped = 0
    racer = Racer(device, timeout_s)  # one worker child for every entry's race: its start costs seconds
    try:
        for n, (key, entry) in enumerate(entries, 1):
            print(f"[ak-cache verify] {n}/{len(entries)} {key}", file=sys.stderr, flush=True)
            result = {"key": key, **recheck_entry(entry, device, timed, racer=racer), "dropped": False}
            counts[result["status"]] += 1
            # An unusable record is never dropped here: it may be a newer autokernel's entry (ak-cache rm does it).
            if drop_failed and result["status"] in ("failed", "stale"):
                cache.delete_entry(key)
                result["dropped"] = True
                dropped += 1
            if as_json:
                print(json.dumps(result))
            else:
                check = f"{result['check']}: " if result["check"] else ""
                print(f"  {result['status'].upper() if result['status'] != 'ok' else 'ok':8s} {key}  {check}"
                      f"{result['detail']}{'  [dropped]' if result['dropped'] else ''}")
    finally:
        racer.close()
    cache.close()
    if not entries:
        print(f"{cache.path}: no entries to recheck", file=sys.stderr if as_json else sys.stdout)
    elif not as_json:
        print(f"{cache.path}: {len(entries)} entries rechecked: {counts['ok']} ok, {counts['failed']} failed, "
              f"{counts['stale']} stale, {counts['unusable']} unusable"
              + (f"; {dropped} dropped" if drop_failed else "")
              + ("" if timed else " (not timed: Triton interpreter)"))
    return 1 if counts["failed"] or counts["unusable"] else 0


def recheck_entry(entry: Any, device: torch.device, timed: bool, timeout_s: float = 180.0,
                  racer: Racer | None = None) -> dict[str, Any]:
    """Recheck one entry: ``{"status": "ok"|"failed"|"stale"|"unusable", "check": the failed check or '',
    "detail": words, "times": re-measured ms (when timed)}``.

    The correctness checks are the ones AUTOKERNEL_VERIFY runs (:func:`verify_entry`, in this process, on up
    to 64 rows); when ``timed`` (a GPU), the tuner's worker then checks the kernel again at the tuned shape
    and races it against Inductor, as ``ak-tune`` did (in ``racer``'s worker when given, else in a worker of
    its own with ``timeout_s``)."""
    from autokernel.playbook.checks import CheckFailed
    from autokernel.playbook.tuner import verify_entry

    problem = entry_problem(entry)
    if problem:
        return {"status": "unusable", "check": "entry format", "detail": problem, "times": {}}
    try:
        verify_entry(entry, device)
    except CheckFailed as exc:
        return {"status": "failed", "check": exc.stage, "detail": exc.detail, "times": {}}
    except Exception as exc:  # the kernel or its problem cannot even be built: as AUTOKERNEL_VERIFY, a failure
        return {"status": "failed", "check": "setup", "detail": f"{type(exc).__name__}: {exc}", "times": {}}
    if not timed:
        return {"status": "ok", "check": "", "detail": "checks passed; not timed (interpreter)", "times": {}}
    if racer is not None:
        return racer.race(entry)
    racer = Racer(device, timeout_s)
    try:
        return racer.race(entry)
    finally:
        racer.close()


class Racer:
    """Races entries' kernels against Inductor at their tuned shapes in the tuner's worker process (a kernel
    that crashes or hangs takes the worker down, not ak-cache; the next race starts another). One child
    serves every race, retargeted from entry to entry."""

    def __init__(self, device: torch.device, timeout_s: float):
        self.device, self.timeout_s = device, timeout_s
        self.worker: Any = None

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def race(self, entry: dict[str, Any]) -> dict[str, Any]:
        from autokernel.lowering import families
        from autokernel.playbook.tuner import (
            TuneRequest,
            Worker,
            WorkerFailure,
            entry_candidate,
            measure_baseline,
            race_slack,
        )

        shape = list(entry.get("shape") or [entry["row_bucket"], entry["hidden"]])
        request = TuneRequest(entry["pattern"], entry["flags"], entry["dtype"], shape)
        problem = families()[entry["pattern"]].problem(entry["flags"], entry["dtype"], shape, self.device)
        if self.worker is None:
            self.worker = Worker(request, self.device, None, self.timeout_s)
        self.worker.retarget(request, None)
        try:
            # No floor is reported here: no copy bandwidth to measure (rates given, empty).
            _floor, peer, peer_problem = measure_baseline(self.worker, problem, rates={})
        except WorkerFailure as exc:
            peer, peer_problem = {"fwd_ms": None, "train_ms": None}, str(exc)
        try:
            reply = self.worker.call("candidate", entry_candidate(entry))
        except WorkerFailure as exc:
            reply = {"status": "crashed", "detail": str(exc)}
        shape_text = "x".join(map(str, shape))
        if reply["status"] == "failed":
            return {"status": "failed", "check": reply["stage"], "detail": f"at {shape_text}: {reply['detail']}",
                    "times": {}}
        if reply["status"] != "ok":
            return {"status": "failed", "check": "run", "detail": f"at {shape_text}: {reply.get('detail', '')}",
                    "times": {}}
        times = {"fwd_ms": reply["fwd_ms"], "train_ms": reply["train_ms"],
                 "inductor_fwd_ms": peer["fwd_ms"], "inductor_train_ms": peer["train_ms"]}
        return {"times": times, **judge_race(entry, times, peer_problem, race_slack(problem))}


def judge_race(entry: dict[str, Any], times: dict[str, float | None], peer_problem: str = "",
               slack: float = 0.0) -> dict[str, str]:
    """``status``, ``check`` and ``detail`` of a re-race: stale when Inductor is now more than
    ``STALE_MARGIN`` faster on a pass the entry serves (passes Inductor already won are not served), beyond the
    problem's race ``slack`` (linear + CE is served up to that much slower for its memory, which a re-race does
    not measure)."""
    if peer_problem:
        return {"status": "ok", "check": "", "detail": f"checks passed; Inductor did not run ({peer_problem})"}
    margin = STALE_MARGIN * (1 + slack)
    lost = [f"{p} {times[f'inductor_{p}_ms']:.4f} ms vs ours {times[f'{p}_ms']:.4f} ms"
            for p in ("fwd", "train")
            if entry["winner"][p] == "autokernel" and times.get(f"inductor_{p}_ms") is not None
            and times.get(f"{p}_ms") is not None and times[f"inductor_{p}_ms"] * margin < times[f"{p}_ms"]]
    if lost:
        return {"status": "stale", "check": "race", "detail": "Inductor now faster: " + "; ".join(lost)}
    shown = ", ".join(f"{p} {times[f'{p}_ms']:.4f} ms (Inductor {times[f'inductor_{p}_ms']:.4f})"
                      for p in ("fwd", "train")
                      if times.get(f"{p}_ms") is not None and times.get(f"inductor_{p}_ms") is not None)
    return {"status": "ok", "check": "", "detail": f"checks passed; {shown}" if shown else "checks passed"}


def _bundles(args: argparse.Namespace) -> int:
    from autokernel.cache.bundle import BundleError, export_bundle, import_bundle, read_bundle, signing_key
    from autokernel.cache.store import default_cache_dir

    root = args.cache_dir or default_cache_dir()
    try:
        key = signing_key(args.key_file)
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
