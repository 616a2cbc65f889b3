"""ak-cache export / import / verify: a bundle travels intact, and a bad one is refused with nothing written."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time

import pytest
import torch
from models import HFLlama

import autokernel
from autokernel.cache import KernelCache, row_bucket
from autokernel.cache import cli as cache_cli
from autokernel.cache.bundle import BundleError, export_bundle, import_bundle, read_bundle
from autokernel.lowering.rms_norm.ops import pattern_key

H = 40


def _entry(rows: int, train_ms: float, hidden: int = H) -> dict:
    return {
        "version": 1, "pattern": "rms_norm",
        "pattern_key": pattern_key("llama", 0.0, torch.bfloat16, torch.bfloat16, torch.bfloat16),
        "hidden": hidden, "row_bucket": row_bucket(rows), "kernel": {"kind": "family", "config": {}},
        "winner": {"fwd": "autokernel", "train": "autokernel"}, "producer": {"strategy": "test"},
        "checks": [], "created": time.time(), "times": {"train_ms": train_ms},
    }


@pytest.fixture
def source_cache(tmp_path):
    cache = KernelCache(tmp_path / "tuned", device="cpu")
    cache.put_entry(_entry(7, 1.0))
    cache.put_entry(_entry(300, 2.0))
    other = KernelCache(tmp_path / "tuned", fingerprint_="NVIDIA_H100_80GB_HBM3-sm132-cc90-torch2.11.0-triton3.6.0")
    other.put_entry(_entry(8192, 0.25, hidden=8192))
    return tmp_path / "tuned"


def test_round_trip_serves_hits(tmp_path, source_cache):
    bundle = tmp_path / "b.akc"
    manifest = export_bundle(source_cache, bundle)
    assert len(manifest["entries"]) == 3 and manifest["signature"] is None
    report = import_bundle(bundle, tmp_path / "deployed")
    assert len(report.added) == 3
    torch._dynamo.reset()
    rep = autokernel.explain(HFLlama(H).to(torch.bfloat16), torch.randn(7, H, dtype=torch.bfloat16),
                             options={"autokernel.cache_dir": str(tmp_path / "deployed")})
    assert [i.status for i in rep.instances] == ["hit"]
    # Another GPU's entries came along under their own fingerprint: they can only hit on that GPU.
    assert (tmp_path / "deployed" / "NVIDIA_H100_80GB_HBM3-sm132-cc90-torch2.11.0-triton3.6.0" / "db").is_dir()


def test_a_bundle_from_another_gpu_model_or_triton_misses_cleanly(tmp_path, caplog):
    """Portability's other half: entries tuned for exactly this instance on another GPU model, and under another
    triton on this one, travel in a bundle and import, and the instance is a plain miss served by Inductor:
    the right answer and no warning, not an error."""
    here = KernelCache(tmp_path / "probe", device="cpu").fingerprint
    other_triton = here.rsplit("-triton", 1)[0] + "-triton0.0.1"
    for fingerprint in ("NVIDIA_H200-sm132-cc90-torch2.11.0-triton3.6.0", other_triton):
        KernelCache(tmp_path / "tuned", fingerprint_=fingerprint).put_entry(_entry(7, 1.0))
    bundle = tmp_path / "b.akc"
    export_bundle(tmp_path / "tuned", bundle)
    assert len(import_bundle(bundle, tmp_path / "deployed").added) == 2
    model, x = HFLlama(H).to(torch.bfloat16), torch.randn(7, H, dtype=torch.bfloat16)
    options = {"autokernel.cache_dir": str(tmp_path / "deployed")}
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="autokernel"):
        rep = autokernel.explain(model, x, options=options)
        torch._dynamo.reset()
        out = torch.compile(model, backend="autokernel", options=options)(x)
    assert [i.status for i in rep.instances] == ["miss"] and not rep.errors
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    torch.testing.assert_close(out, model(x))


def test_merge_keeps_the_faster_entry(tmp_path, source_cache):
    bundle = tmp_path / "b.akc"
    export_bundle(source_cache, bundle, fingerprint=KernelCache(source_cache, device="cpu").fingerprint)
    local = KernelCache(tmp_path / "deployed", device="cpu")
    local.put_entry(_entry(7, 0.5))  # faster than the bundle's 1.0
    local.put_entry(_entry(300, 9.0))  # slower than the bundle's 2.0
    report = import_bundle(bundle, tmp_path / "deployed")
    assert len(report.kept) == 1 and "R=8" in report.kept[0]
    assert len(report.replaced) == 1 and "R=512" in report.replaced[0]
    times = sorted(e["times"]["train_ms"] for _, e in local.entries())
    assert times == [0.5, 2.0]


def test_signing(tmp_path, source_cache, monkeypatch, capsys):
    signed, unsigned = tmp_path / "s.akc", tmp_path / "u.akc"
    export_bundle(source_cache, signed, key=b"secret")
    export_bundle(source_cache, unsigned)
    read_bundle(signed, key=b"secret")
    with pytest.raises(BundleError, match="signature does not match"):
        read_bundle(signed, key=b"another key")
    with pytest.raises(BundleError, match="unsigned and a signing key is set"):
        import_bundle(unsigned, tmp_path / "d1", key=b"secret")
    assert not (tmp_path / "d1").exists()
    assert len(import_bundle(unsigned, tmp_path / "d2", key=b"secret", allow_unsigned=True).added) == 3
    # Through the CLI, with the key from the environment.
    monkeypatch.setenv("AUTOKERNEL_SIGNING_KEY", "secret")
    assert cache_cli.main(["--cache-dir", str(tmp_path / "d3"), "import", str(signed)]) == 0
    assert "signature verified" in capsys.readouterr().out
    assert cache_cli.main(["--cache-dir", str(tmp_path / "d4"), "import", str(unsigned)]) == 1
    assert "refused: the bundle is unsigned" in capsys.readouterr().err
    assert cache_cli.main(["--cache-dir", str(source_cache), "export", "-o", str(tmp_path / "c.akc"), "--sign"]) == 0
    assert cache_cli.main(["verify", str(tmp_path / "c.akc")]) == 0
    assert "3 entries, every hash matches, signature verified" in capsys.readouterr().out


def _tamper(src, dst, edit):
    """Copy a bundle, letting ``edit(members)`` change the {name: bytes} dict or add raw TarInfo objects."""
    with tarfile.open(src, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    extra = edit(members) or []
    with tarfile.open(dst, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _manifest_edit(fn):
    def edit(members):
        manifest = json.loads(members["manifest.json"])
        fn(manifest)
        members["manifest.json"] = json.dumps(manifest).encode()
    return edit


def _symlink(members):
    info = tarfile.TarInfo("e9999.json")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return [(info, None)]


def _traversal(members):
    info = tarfile.TarInfo("../../evil.json")
    info.size = 2
    return [(info, b"{}")]


def _oversized(members):
    info = tarfile.TarInfo("e9998.json")
    data = b" " * (16 * 2**20 + 1)
    info.size = len(data)
    return [(info, data)]


def _tampered_entry(members):
    entry = json.loads(members["e0000.json"])
    entry["kernel"]["config"] = {"fwd_num_warps": 32}
    members["e0000.json"] = json.dumps(entry, sort_keys=True).encode()


HOSTILE = {
    "symlink": (_symlink, "not a plain file"),
    "path traversal": (_traversal, "is not allowed"),
    "oversized": (_oversized, r"bytes \(limit"),
    "tampered entry": (_tampered_entry, "sha256 differs from the manifest"),
    "bad manifest": (lambda m: m.update({"manifest.json": b"{not json"}), "not JSON"),
    "wrong format": (_manifest_edit(lambda m: m.update({"format": 99})), "format 99"),
    "hash mismatch": (_manifest_edit(lambda m: m["entries"][0].update({"sha256": "0" * 64})), "sha256 differs"),
    "missing member": (lambda m: m.pop("e0001.json") and None, "is missing"),
    "foreign fingerprint name": (_manifest_edit(lambda m: m["entries"][0].update({"fingerprint": "../x"})),
                                 "not a plain name"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_bundles_are_refused_and_nothing_is_written(tmp_path, source_cache, case):
    edit, message = HOSTILE[case]
    good, bad = tmp_path / "good.akc", tmp_path / "bad.akc"
    export_bundle(source_cache, good)
    _tamper(good, bad, edit)
    with pytest.raises(BundleError, match=message):
        import_bundle(bad, tmp_path / "target")
    assert not (tmp_path / "target").exists()
    assert not (tmp_path / "evil.json").exists()


def test_not_a_bundle(tmp_path):
    junk = tmp_path / "junk.akc"
    junk.write_bytes(b"not a tar")
    with pytest.raises(BundleError, match="not a bundle"):
        read_bundle(junk)


def test_cli_refuses_bad_paths_keys_and_ages_without_a_traceback(tmp_path, source_cache, capsys):
    """An export into a missing folder, a missing or empty key file, a negative age or timeout: one line naming
    what was wrong, a non-zero exit, no half-written bundle, no entry dropped."""
    root = ["--cache-dir", str(source_cache)]
    assert cache_cli.main([*root, "export", "-o", str(tmp_path / "no" / "b.akc")]) == 1
    assert "refused: cannot write " in capsys.readouterr().err and not (tmp_path / "no").exists()
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"\n")
    for key_file, why in [(tmp_path / "missing.key", "No such file"), (empty, "is empty")]:
        assert cache_cli.main([*root, "export", "-o", str(tmp_path / "k.akc"), "--sign", "--key-file",
                               str(key_file)]) == 1
        assert f"--key-file {key_file}" in (err := capsys.readouterr().err) and why in err
        assert not (tmp_path / "k.akc").exists()
    for args, what in [(["prune", "--older-than", "-1"], "days"), (["verify", "--rerun", "--timeout", "0"],
                                                                  "seconds")]:
        with pytest.raises(SystemExit):
            cache_cli.main([*root, *args])
        assert f"expected a positive number of {what}" in capsys.readouterr().err
    assert len(list(KernelCache(source_cache, device="cpu").entries())) == 2
