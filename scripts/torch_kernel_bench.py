#!/usr/bin/env python3
"""The PyTorch side of `llama2 bench kernels --vs-torch`: PyTorch's own equivalents of each kernel
on the same shapes (bf16 on the GPU), timed with CUDA events over the same repetitions after one
warm-up call. Prints one JSON line: {"device": ..., "ms": {"<config>/<kernel>": ms, ...}}; the
kernel names match trainer/src/kernel_bench.rs.

Equivalents: residual add (a + b), F.rms_norm and its autograd backward, the RoPE expression
(q * cos + rotate_half(q) * sin), F.embedding and its backward, SwiGLU (F.silu(g) * u) and its
autograd backward, x @ w.T and both backward products, F.scaled_dot_product_attention with the
flash backend (causal; GQA via enable_gqa), F.cross_entropy forward and backward, fused AdamW
(torch.optim.AdamW(fused=True)) and torch.linalg.vector_norm for the gradient norm."""
import argparse, json, sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help='JSON {"shapes": [...], "reps": N}')
    a = ap.parse_args()
    spec = json.loads(a.spec)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(json.dumps({"error": f"PyTorch not importable ({e}): pip install torch"}))
        return 2
    if not torch.cuda.is_available():
        print(json.dumps({"error": "PyTorch sees no CUDA GPU"}))
        return 2
    dev = torch.device("cuda")
    bf = torch.bfloat16
    reps = int(spec.get("reps", 20))

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e) / reps

    out = {}
    for sh in spec["shapes"]:
        name = sh["name"]
        b, t, h, nh, nkv, hd, im, v = (sh[k] for k in
                                         ("batch", "seq", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab"))
        n = b * t

        def put(kernel, fn):
            try:
                out[f"{name}/{kernel}"] = timed(fn)
            except Exception as ex:  # a missing op in this torch version: leave the cell empty
                print(f"{name}/{kernel}: {ex}", file=sys.stderr)
            torch.cuda.empty_cache()

        x = torch.randn(n, h, device=dev, dtype=bf)
        y = torch.randn(n, h, device=dev, dtype=bf)
        w = torch.ones(h, device=dev, dtype=bf)
        put("add (residual)", lambda: x + y)
        put("rmsnorm_fwd", lambda: F.rms_norm(x, (h,), w, 1e-5))
        xr = x.clone().requires_grad_(True)
        wr = w.clone().requires_grad_(True)
        yr = F.rms_norm(xr, (h,), wr, 1e-5)
        put("rmsnorm_bwd (+residual)", lambda: torch.autograd.grad(yr, (xr, wr), y, retain_graph=True))
        del xr, wr, yr

        ids = (torch.arange(n, device=dev) * 7919) % v
        wte = torch.randn(v, h, device=dev, dtype=bf)
        put("embedding_fwd", lambda: F.embedding(ids, wte))
        wter = wte.clone().requires_grad_(True)
        emb = F.embedding(ids, wter)
        put("embedding_bwd", lambda: torch.autograd.grad(emb, wter, y, retain_graph=True))
        del wte, wter, emb

        q = torch.randn(b, t, nh, hd, device=dev, dtype=bf)
        pos = torch.arange(t, device=dev, dtype=torch.float32)
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
        ang = torch.outer(pos, inv)
        emb_a = torch.cat((ang, ang), dim=-1)
        cos, sin = emb_a.cos().to(bf)[None, :, None, :], emb_a.sin().to(bf)[None, :, None, :]

        def rope():
            q1, q2 = q[..., : hd // 2], q[..., hd // 2:]
            return q * cos + torch.cat((-q2, q1), dim=-1) * sin
        put("rope_fwd (q)", rope)

        g = torch.randn(n, im, device=dev, dtype=bf)
        u = torch.randn(n, im, device=dev, dtype=bf)
        put("swiglu_fwd", lambda: F.silu(g) * u)
        gr, ur = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
        hm = F.silu(gr) * ur
        put("swiglu_bwd", lambda: torch.autograd.grad(hm, (gr, ur), g, retain_graph=True))
        del gr, ur, hm

        wu = torch.randn(im, h, device=dev, dtype=bf)
        put("matmul_fwd (up)", lambda: x @ wu.t())
        put("matmul_bwd_data (up)", lambda: g @ wu)
        put("matmul_bwd_weight (up)", lambda: g.t() @ x)  # bf16 out (ours: f32 += )
        del g, u, wu

        qa = torch.randn(b, nh, t, hd, device=dev, dtype=bf)
        ka = torch.randn(b, nkv, t, hd, device=dev, dtype=bf)
        va = torch.randn(b, nkv, t, hd, device=dev, dtype=bf)
        gqa = nkv != nh
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def att(qq, kk, vv):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=gqa)
        put("attention_fwd", lambda: att(qa, ka, va))
        qr, kr, vr = (z.clone().requires_grad_(True) for z in (qa, ka, va))
        o = att(qr, kr, vr)
        do = torch.randn_like(o)
        put("attention_bwd", lambda: torch.autograd.grad(o, (qr, kr, vr), do, retain_graph=True))
        del qa, ka, va, qr, kr, vr, o, do

        logits = torch.randn(n, v, device=dev, dtype=bf)
        tg = (torch.arange(n, device=dev) * 31) % v
        put("cross_entropy_fwd", lambda: F.cross_entropy(logits, tg))
        lr_ = logits.clone().requires_grad_(True)
        loss = F.cross_entropy(lr_, tg)
        put("cross_entropy_bwd (in place)", lambda: torch.autograd.grad(loss, lr_, retain_graph=True))
        del logits, lr_, loss

        p = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * im + 2 * h
        param = torch.nn.Parameter(torch.zeros(p, device=dev, dtype=torch.float32))
        param.grad = torch.zeros_like(param)
        opt = torch.optim.AdamW([param], lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, fused=True)
        put("adamw (fused, +bf16 shadow)", opt.step)
        put("sum_squares (grad norm)", lambda: torch.linalg.vector_norm(param.grad))
        del param, opt
    print(json.dumps({"device": f"{torch.cuda.get_device_name()} (torch {torch.__version__})", "ms": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
