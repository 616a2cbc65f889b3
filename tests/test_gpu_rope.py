"""GPU checks of rotary position embedding (marker ``gpu``; run on the device machine: ``pytest -m gpu``): the
kernels at real sizes in every dtype against float64, every ak-tune candidate through the checks, the backend
end to end on CUDA (static shapes: Inductor's code launches our kernel; dynamic shapes: the opaque ops), and
opcheck of both flavours of the ops. Needs no transformers: the HF spelling is written out here."""

from __future__ import annotations

import pytest
import torch
from models import rope_entry

import autokernel
from autokernel.cache import KernelCache
from autokernel.lowering.rope.kernels import (
    RopeConfig,
    default_config,
    dim_order,
    rope_bwd,
    rope_fwd,
    rope_reference,
)
from autokernel.playbook.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu there)")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _cos_sin(b, s, r, dtype, g, layout="half"):
    """cos/sin [B, 1, S, R] at random positions (one value per pair, R/2 of them, for the complex layout)."""
    pos = torch.randint(0, 8 * s, (b, s), device="cuda", generator=g).double()
    ang = pos[..., None] / 10000.0 ** (torch.arange(0, r, 2, device="cuda", dtype=torch.float64) / r)
    emb = {"half": torch.cat((ang, ang), -1), "interleaved": ang.repeat_interleave(2, -1), "complex": ang,
           "deinterleave": ang, "half_pairs": ang}[layout]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _check(b, hq, hk, s, d, dtype, layout="half", rotary_dim=None, config=None, cs_dtype=None):
    """q and k as HF's strided transposes, cos/sin [B, 1, S, R] at random positions; outputs and grads vs float64."""
    r = rotary_dim or d
    g = torch.Generator(device="cuda").manual_seed(b * 131 + s + d)
    q = torch.randn(b, s, hq, d, device="cuda", generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(b, s, hk, d, device="cuda", generator=g).to(dtype).transpose(1, 2) if hk else None
    if layout == "complex":  # freqs_cis's parts are float32
        cs_dtype = torch.float32
    cos, sin = _cos_sin(b, s, r, cs_dtype or dtype, g, layout)
    out_dtype = torch.promote_types(dtype, cos.dtype)
    cfg = config or default_config(d, b * hq * s, dtype)
    qo, ko = rope_fwd(q, k, cos, sin, layout, r, out_dtype, cfg)
    dq = torch.randn(q.shape, device="cuda", generator=g).to(out_dtype)
    dk = torch.randn(k.shape, device="cuda", generator=g).to(out_dtype) if k is not None else None
    gq, gk = rope_bwd(dq, dk, cos, sin, layout, r, dtype, cfg)
    q64 = q.detach().double().requires_grad_(True)
    k64 = k.detach().double().requires_grad_(True) if k is not None else None
    rq, rk = rope_reference(q64, k64, cos, sin, layout, r)
    torch.autograd.backward([t for t in (rq, rk) if t is not None],
                            [t.double() for t in (dq, dk) if t is not None])
    assert_close(qo, rq, dtype, "q")
    assert_close(gq, q64.grad, dtype, "dq")
    if k is not None:
        assert_close(ko, rk, dtype, "k")
        assert_close(gk, k64.grad, dtype, "dk")
    again = (*rope_fwd(q, k, cos, sin, layout, r, out_dtype, cfg), *rope_bwd(dq, dk, cos, sin, layout, r, dtype, cfg))
    for a, b_ in zip((qo, ko, gq, gk), again, strict=True):
        assert (a is None and b_ is None) or torch.equal(a, b_), "not deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "hq", "hk", "s", "d", "layout", "r"), [
    (4, 32, 8, 4096, 128, "half", None),  # Llama-3 8B's attention at 4 x 4096 tokens
    (1, 32, 8, 1, 128, "half", None),  # decode: one token
    (2, 12, 12, 2049, 64, "half", None),  # odd token count
    (2, 32, 32, 1000, 128, "half", 32),  # Pythia: a quarter of the columns rotated
    (2, 16, 16, 512, 256, "interleaved", 64),  # GPT-J: 64 of 256, even/odd pairs
    (3, 7, 0, 333, 80, "half", 24),  # q alone, odd heads, 12 pairs (not a power of two)
    (2, 32, 8, 1024, 128, "complex", None),  # Meta Llama's freqs_cis
    (2, 128, 1, 2048, 64, "deinterleave", None),  # DeepSeek V3's rotary part: 128 q heads, one shared key head
    (2, 64, 8, 2048, 64, "half_pairs", None),  # GPT-OSS 120B: cos/sin one value per pair
], ids=["llama3_8b", "decode", "odd_seq", "pythia_partial", "gptj_interleaved", "lone_partial", "complex",
        "deepseek_v3", "gpt_oss"])
def test_kernels_real_sizes(b, hq, hk, s, d, layout, r, dtype):
    _check(b, hq, hk, s, d, dtype, layout, r)


def test_float32_cos_sin_with_bf16_q():
    _check(2, 32, 8, 1024, 128, torch.bfloat16, cs_dtype=torch.float32)


@pytest.mark.parametrize("config", [RopeConfig(1, 1, 1, 1), RopeConfig(64, 16, 32, 8), RopeConfig(4, 2, 16, 4)],
                         ids=["smallest", "widest", "mixed"])
def test_extreme_configs(config):
    _check(2, 32, 8, 300, 128, torch.bfloat16, config=config)


def test_every_tuner_candidate_passes_the_checks():
    from autokernel.lowering.rope.problem import RopeProblem
    from autokernel.playbook.checks import run_checks

    problem = RopeProblem({"kv_heads": 8}, "bf16", [2, 32, 256, 128], "cuda")
    for phase, candidate in problem.candidates():
        assert run_checks(problem, candidate, max_rows=2 * 32 * 256), (phase, candidate)


# ---------------------------------------------------------------- the backend on CUDA


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class QKRope(torch.nn.Module):
    """The q/k half of an HF Llama attention: projections, view/transpose, apply_rotary_pos_emb."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = torch.nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _inputs(b, s, model, dtype):
    g = torch.Generator(device="cuda").manual_seed(s)
    x = torch.randn(b, s, model.q_proj.in_features, device="cuda", generator=g).to(dtype)
    cos, sin = _cos_sin(b, s, model.head_dim, dtype, g)
    return x, cos[:, 0], sin[:, 0]


def _fill(model, inputs, cache_dir):
    report = autokernel.explain(model, *inputs, options={"autokernel.cache_dir": cache_dir})
    found = [i for i in report.instances if i.pattern == "rope"]
    assert [(i.status, i.flags["kv_heads"]) for i in found] == [("miss", model.kv_heads)], str(report)
    cache = KernelCache(cache_dir, device="cuda")
    for inst in found:
        cache.put_entry(rope_entry(inst, {}))
    cache.close()


def _check_model(compiled, model, inputs):
    x, cos, sin = inputs
    xr = x.clone().requires_grad_(True)
    qo, ko = compiled(xr, cos, sin)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (dq, dk))
    ref = QKRope(model.q_proj.in_features, model.heads, model.kv_heads, model.head_dim).cuda().double()
    ref.load_state_dict(model.state_dict())
    x64 = x.double().requires_grad_(True)
    rq, rk = ref(x64, cos.double(), sin.double())
    torch.autograd.backward((rq, rk), (dq.double(), dk.double()))
    # The projections run in x's dtype before the rotation: the bf16 row, applied to their grads too.
    assert_close(qo, rq, x.dtype, "q")
    assert_close(ko, rk, x.dtype, "k")
    assert_close(xr.grad, x64.grad, x.dtype, "dx")
    for (name, p), p64 in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, p64.grad, x.dtype, f"d{name}")
        p.grad = None


@pytest.mark.parametrize("dynamic", [False, True])
def test_static_shapes_launch_inline_dynamic_shapes_call_the_opaque_op(dynamic, tmp_path):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = QKRope(512, 8, 2, 64).cuda().to(torch.bfloat16)
    inputs = _inputs(2, 100, model, torch.bfloat16)
    _fill(model, inputs, str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autokernel", dynamic=dynamic,
                             options={"autokernel.cache_dir": str(tmp_path)})
    _, code = run_and_get_code(lambda: _check_model(compiled, model, inputs))
    code = "\n".join(code)
    assert ("autokernel.rope_train" in code) == dynamic
    assert ("autokernel.rope_backward" in code) == dynamic
    assert ("_rope_kernel" in code) != dynamic
    if dynamic:  # a second shape reuses the graph and is served at its own shape
        _check_model(compiled, model, _inputs(3, 37, model, torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_no_grad(dtype, tmp_path):
    torch._dynamo.reset()
    model = QKRope(256, 4, 4, 64).cuda().to(dtype)
    inputs = _inputs(3, 64, model, dtype)
    _fill(model, inputs, str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autokernel", options={"autokernel.cache_dir": str(tmp_path)})
    with torch.no_grad():
        qo, ko = compiled(*inputs)
        ref = QKRope(256, 4, 4, 64).cuda().double()
        ref.load_state_dict(model.state_dict())
        rq, rk = ref(*(t.double() for t in inputs))
        assert_close(qo, rq, dtype, "q")
        assert_close(ko, rk, dtype, "k")


@pytest.mark.parametrize("suffix", ["", "_inline"])
def test_opcheck_cuda(suffix):
    ops = torch.ops.autokernel
    # The inline ops pick their configuration at trace time: the backend gives them static shapes only.
    checks = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor",
                             "test_aot_dispatch_static")} if suffix else {}
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 64, 8, 128, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(2, 64, 2, 128, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    cos, sin = _cos_sin(2, 64, 128, torch.bfloat16, g)
    torch.library.opcheck(getattr(ops, f"rope_train{suffix}"),
                          (q.requires_grad_(True), k.requires_grad_(True), cos, sin, "half", 128, torch.bfloat16, True,
                           True, ""),
                          **checks)
    torch.library.opcheck(getattr(ops, f"rope{suffix}"),
                          (q.detach(), None, cos[..., :32], sin[..., :32], "interleaved", 32, torch.bfloat16, False,
                           False, ""),
                          **checks)
    qs, ks = dim_order(q), dim_order(k)
    torch.library.opcheck(getattr(ops, f"rope_backward{suffix}"),
                          (q.detach(), k.detach(), cos, sin, "half", 128, torch.bfloat16, qs, ks, ""), **checks)
    torch.library.opcheck(getattr(ops, f"rope_backward{suffix}"),
                          (q.detach(), None, cos.float(), sin.float(), "half", 128, torch.bfloat16, qs, [], ""),
                          **checks)
