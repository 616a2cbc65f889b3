"""Many GPUs and many hosts, on the CPU: ak-tune --shard and --gpus (its pool survives dying workers), and
the backend under DistributedDataParallel over gloo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autokernel.cache import KernelCache
from autokernel.lowering.rms_norm.ops import pattern_key
from autokernel.playbook import cli, pool, tuner
from autokernel.playbook.pool import Shard
from autokernel.playbook.tuner import TuneRequest

REPO = Path(__file__).resolve().parent.parent
FLAGS = {"mode": "llama", "offset": 0.0, "weight": "fp32", "out": "fp32"}


def _want(cache: KernelCache, *hiddens: int, rows: int = 4) -> None:
    """Record rms_norm misses of ``rows`` x hidden, fp32, as a compile would."""
    for hidden in hiddens:
        cache.record_wanted("rms_norm", pattern_key("llama", 0.0, torch.float32, torch.float32, torch.float32),
                            FLAGS, "fp32", [rows, hidden], hidden, rows)


def _listed(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.startswith("  ")]


def test_shard_rejects_bad_input(tmp_path, capsys):
    for text, message in (("3/2", "needs 1 <= K <= N"), ("0/2", "needs 1 <= K <= N"), ("1/0", "needs 1 <= K <= N"),
                          ("x", "looks like K/N"), ("2", "looks like K/N"), ("1/2/3", "looks like K/N")):
        with pytest.raises(SystemExit):
            cli.main(["--cache-dir", str(tmp_path), "--list", "--shard", text])
        err = capsys.readouterr().err
        assert "argument --shard" in err and message in err and repr(text) in err, err
    assert Shard.parse("2/2") == Shard(2, 2) and str(Shard(1, 3)) == "1/3"


def test_shards_split_the_wanted_table_the_same_way_on_every_host(tmp_path, capsys):
    """Each request lands in exactly one share, whatever the order of the table, and in the same share in
    another process (whose str hashes are salted differently) and in another autokernel version (pinned)."""
    hiddens = list(range(32, 32 + 16 * 8, 8))
    host_a, host_b = KernelCache(tmp_path / "a", device="cpu"), KernelCache(tmp_path / "b", device="cpu")
    _want(host_a, *hiddens)
    _want(host_b, *reversed(hiddens))
    shares = {}
    for host in ("a", "b"):
        for k in (1, 2, 3):
            assert cli.main(["--cache-dir", str(tmp_path / host), "--list", "--shard", f"{k}/3"]) == 0
            out = capsys.readouterr().out
            shares[host, k] = set(_listed(out))
            assert f"(shard {k}/3: {len(shares[host, k])} of 16):" in out
    for k in (1, 2, 3):
        assert shares["a", k] == shares["b", k] and shares["a", k]
    assert set.union(*(shares["a", k] for k in (1, 2, 3))) == set(_listed(_list_all(tmp_path / "a", capsys)))
    assert sum(len(shares["a", k]) for k in (1, 2, 3)) == 16
    env = dict(os.environ, PYTHONHASHSEED="12345")
    other = subprocess.run([sys.executable, "-m", "autokernel.playbook.cli", "--cache-dir", str(tmp_path / "a"),
                            "--list", "--shard", "2/3"], env=env, capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr[-2000:]
    assert set(_listed(other.stdout)) == shares["a", 2]
    # Pinned: hosts running different autokernel versions must still agree on the owner.
    request = TuneRequest("rms_norm", FLAGS, "fp32", [4, 64])
    assert [k for k in (1, 2, 3) if Shard(k, 3).owns(request)] == [1]
    assert TuneRequest("rms_norm", FLAGS, "fp32", [3, 64]).identity() == request.identity()  # same row bucket


def _list_all(root, capsys) -> str:
    assert cli.main(["--cache-dir", str(root), "--list"]) == 0
    return capsys.readouterr().out


def test_shard_tunes_its_share_on_every_worker(tmp_path, capsys):
    """--shard with --gpus: this host's share goes through the pool; the other shares stay wanted for their hosts."""
    cache = KernelCache(tmp_path, device="cpu")
    _want(cache, 32, 40, 72, 80)
    mine = {w["hidden"] for _, w in cache.wanted() if Shard(1, 2).owns(TuneRequest(*_request_args(w)))}
    assert mine == {72, 80}
    assert cli.main(["--cache-dir", str(tmp_path), "--shard", "1/2", "--gpus", "0,1", "-q"]) == 0
    assert {e["hidden"] for _, e in cache.entries()} == {72, 80}
    assert {w["hidden"] for _, w in cache.wanted()} == {32, 40}
    assert cli.main(["--cache-dir", str(tmp_path), "--shard", "1/2", "--list"]) == 0
    assert "(shard 1/2: 0 of" in capsys.readouterr().out
    assert cli.main(["--cache-dir", str(tmp_path), "--shard", "1/2"]) == 0
    assert "nothing to tune (shard 1/2: 0 of" in capsys.readouterr().out


def _request_args(w: dict) -> tuple:
    return w["pattern"], w["flags"], w["dtype"], w["shape"]


def test_gpus_all_without_cuda_is_one_cpu_worker(tmp_path, capsys):
    assert cli.main(["--cache-dir", str(tmp_path), "--gpus", "all", "--list"]) == 0
    assert "--gpus all: no CUDA device here; tuning with one CPU worker" in capsys.readouterr().err
    assert cli._devices("all", torch.device("cpu"), cli._parser()) == [torch.device("cpu")]
    assert cli._devices("0,1", torch.device("cpu"), cli._parser()) == [torch.device("cpu")] * 2


def test_a_worker_killed_mid_shape_costs_one_candidate(tmp_path, monkeypatch):
    """A worker child killed while the pool tunes: its candidate is logged as crashed, a fresh child runs
    the next one, every shape is written once, none twice."""
    cache = KernelCache(tmp_path, device="cpu")
    _want(cache, 32, 40)
    killed = []
    call = tuner.Worker.call

    def call_killing_once(self, *request):
        if request[0] == "candidate" and self.args["shape"][-1] == 40 and not killed:
            call(self, "bandwidth")  # a child holding this shape's problem (the device's child, reused)
            killed.append(self.proc.pid)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return call(self, *request)

    monkeypatch.setattr(tuner.Worker, "call", call_killing_once)
    assert cli.main(["--cache-dir", str(tmp_path), "--gpus", "0,1", "-q"]) == 0
    assert len(killed) == 1 and cache.wanted() == []
    assert sorted(e["hidden"] for _, e in cache.entries()) == [32, 40]
    runs = sorted(cache.runs_dir.iterdir())
    assert len(runs) == 2 and all((run / "done").read_text().strip() == "written" for run in runs)
    (run_40,) = [run for run in runs if "-4x40-" in run.name]
    rows = (run_40 / "results.tsv").read_text().splitlines()[1:]
    assert "\tcrashed\t" in rows[0] and ("worker pipe closed" in rows[0] or "worker died" in rows[0]), rows[0]
    assert any("\tok\t" in row for row in rows[1:])


def test_a_shape_whose_worker_dies_is_queued_again_once(tmp_path, monkeypatch, capsys, caplog):
    """In the --gpus pool, a shape whose worker child dies before it is ready (a sick device), or whose tune
    raises, goes back to the queue once; the second failure is recorded as an error. Either way the thread
    goes on with the queue: the other shapes are tuned, and nothing is tuned twice."""
    cache = KernelCache(tmp_path, device="cpu")
    _want(cache, 32, 40, 48, 56)
    make_args = tuner.Worker._args

    def args_dying(self, request, max_rows):
        # The device's child is made for one shape and retargeted to the next ones; either way a KeyError
        # in the child: it dies before it says "ready", or answers the swap with an error.
        args = make_args(self, request, max_rows)
        hidden = request.shape[-1]
        if hidden == 48 or (hidden == 40 and tunes.get(40) == 1):  # 40: its first attempt only
            args["pattern"] = "no_such_pattern"
        return args

    tunes: dict[int, int] = {}
    tune = pool.tune

    def tune_raising(request, *args, **kwargs):
        tunes[request.shape[-1]] = tunes.get(request.shape[-1], 0) + 1
        if request.shape[-1] == 56:
            raise RuntimeError("a bug in the tuner")
        return tune(request, *args, **kwargs)

    monkeypatch.setattr(tuner.Worker, "_args", args_dying)
    monkeypatch.setattr(pool, "tune", tune_raising)
    assert cli.main(["--cache-dir", str(tmp_path), "--gpus", "0,1", "-q"]) == 1
    out = capsys.readouterr().out
    assert tunes == {32: 1, 40: 2, 48: 2, 56: 2}
    assert sorted(e["hidden"] for _, e in cache.entries()) == [32, 40]
    assert sorted(w["hidden"] for _, w in cache.wanted()) == [48, 56]
    assert out.count("queued again") == 3
    (line_48,) = [line for line in out.splitlines() if line.startswith("rms_norm 4x48 fp32") and "error:" in line]
    assert ("worker did not start: worker died" in line_48
            or "worker could not load no_such_pattern" in line_48), line_48
    assert "error: ak-tune raised RuntimeError: a bug in the tuner" in out
    assert sum("a bug in the tuner" in (r.exc_text or "") for r in caplog.records) == 2  # with its traceback
    summary = [line.split() for line in out.splitlines() if line.startswith("rms_norm ") and ":" not in line]
    assert sorted((row[1], row[3]) for row in summary) == [("4x32", "written"), ("4x40", "written"),
                                                           ("4x48", "error"), ("4x56", "error")]


TWO_NORMS = '''
import torch


class TwoNorms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = torch.nn.RMSNorm(72), torch.nn.RMSNorm(32)
        self.lin = torch.nn.Linear(72, 32)

    def forward(self, x):
        return self.n2(self.lin(self.n1(x)))


def make():
    torch.manual_seed(0)
    return TwoNorms(), (torch.randn(4, 72, requires_grad=True),)
'''


def test_model_list_shows_this_shares_misses(tmp_path, capsys):
    """--model --list --shard: the model's misses this share owns, listed, none tuned."""
    model_file = tmp_path / "two_norms.py"
    model_file.write_text(TWO_NORMS)
    assert cli.main(["--model", f"{model_file}:make", "--cache-dir", str(tmp_path / "c"), "--list",
                     "--shard", "1/2"]) == 0
    out = capsys.readouterr().out
    cache = KernelCache(tmp_path / "c", device="cpu")
    wanted = [TuneRequest(*_request_args(w)) for _, w in cache.wanted()]
    assert len(wanted) == 2 and list(cache.entries()) == []
    mine = [r.label() for r in wanted if Shard(1, 2).owns(r)]
    assert len(mine) == 1  # the 72-wide norm; the 32-wide one is share 2's
    assert f"(shard 1/2: {len(mine)} of the model's 2):" in out
    assert [line.rsplit("  ", 1)[0] for line in _listed(out)] == mine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_over_gloo_matches_eager_ddp(tmp_path):
    """Two ranks train a small RMSNorm + SwiGLU block under DDP, compiled with backend="autokernel" from a
    cache that serves both patterns: each rank's losses (the second step's after the gradients were averaged
    over both ranks) and final weights match an eager DDP run's, the ranks end with the same weights, and
    both made the same decisions (our kernels for both instances)."""
    from ddp_worker import BATCH, make_block
    from models import serve_every_miss

    cache_dir = tmp_path / "cache"
    torch.compile(make_block(), backend="autokernel",
                  options={"autokernel.cache_dir": str(cache_dir), "autokernel.compiler": "aot_eager"})(
        torch.randn(BATCH))
    torch._dynamo.reset()
    assert serve_every_miss(cache_dir, "cpu") == 2
    env = dict(os.environ, TRITON_INTERPRET="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    ranks = [subprocess.Popen([sys.executable, str(REPO / "tests" / "ddp_worker.py"), str(cache_dir),
                               str(tmp_path / f"rank{rank}")], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    for proc in ranks:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        torch.testing.assert_close(report["compiled"], report["eager"], rtol=1e-5, atol=1e-6)
        assert report["weights_max_diff"] < 1e-5, report
        assert sorted(report["planned"]) == ["rms_norm hit", "swiglu hit"], report["planned"]
    assert reports[0]["planned"] == reports[1]["planned"]
    assert reports[0]["eager"][0] != reports[1]["eager"][0]  # each rank had its own batch
    weights = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0)


def test_budget_shares_follow_the_time_a_job_could_save():
    """ak-tune --model gives each job time in proportion to its Amdahl gain; without gains, equal shares."""
    def job(weight):
        return pool.Job(TuneRequest("rms_norm", FLAGS, "fp32", [4, 32]), weight=weight)

    a, b, c = job(3.0), job(1.0), job(0.0)
    assert pool.budget_share(a, [b, c], 40.0, 1) == pytest.approx(30.0)
    assert pool.budget_share(b, [c], 40.0, 1) == pytest.approx(40.0)
    assert pool.budget_share(c, [b], 40.0, 1) == 0.0  # saves nothing: started, one candidate, no share
    assert pool.budget_share(c, [], 40.0, 1) == pytest.approx(40.0)  # the last job: the time has no better use
    assert pool.budget_share(job(-0.1), [b], 40.0, 1) == 0.0  # measured under its floor (noise): nothing to gain
    assert pool.budget_share(a, [b], 40.0, 2) == pytest.approx(60.0)  # two devices drain the queue together
    assert pool.budget_share(a, [job(None)], 40.0, 1) == pytest.approx(20.0)  # a gain unknown: equal shares
    assert pool.budget_share(c, [job(0.0)], 40.0, 1) == pytest.approx(20.0)  # nothing to gain anywhere: equal
