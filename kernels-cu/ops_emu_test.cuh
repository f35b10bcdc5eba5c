// CPU test of the real source of the non-attention kernels, run under the host emulation
// (ops_emu.cuh over attention_emu.cuh: one fiber per CUDA thread, real barriers and shuffles),
// against straight ports of engine/src/ops.rs. Both the 128-bit and the scalar paths run
// (aligned widths, and odd widths / offset pointers), with grids smaller than the work so the
// grid-stride loops wrap. Build and run (no GPU needed):
//
//   g++ -std=c++20 -O2 -ffp-contract=off -DLLAMA2_HOST_EMU -x c++ kernels-cu/ops_emu_test.cuh \
//       -o /tmp/ops_emu && /tmp/ops_emu
//
// Bound per tensor (the bf16 rule): max |got - ref| <= 2 x max |bf16(ref) - ref| + floor x max|ref|.
#define LLAMA2_HOST_EMU
#include "adamw.cu"
#include "elementwise.cu"
#include "embedding.cu"
#include "reduce.cu"
#include "rmsnorm.cu"
#include "rope.cu"
#include "scalar_head.cu"
#include "softmax_xent.cu"

#include <algorithm>
#include <numeric>
#include <string>

static int g_fail = 0, g_pass = 0;

static float r16(float x) { return bf2f(f2bf(x)); }

struct Rng {
    uint64_t s;
    float uni(float lo, float hi) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        return lo + (hi - lo) * (float)((s >> 40) & 0xffffff) / 16777216.f;
    }
    std::vector<float> vec(size_t n, float scale, bool round = true) {
        std::vector<float> v(n);
        for (auto& x : v) x = round ? r16(uni(-scale, scale)) : uni(-scale, scale);
        return v;
    }
};

static std::vector<bf16> to16(const std::vector<float>& v) {
    std::vector<bf16> r(v.size() + 8);  // slack for offset views
    for (size_t i = 0; i < v.size(); i++) r[i] = f2bf(v[i]);
    return r;
}
static std::vector<float> from16(const bf16* p, size_t n) {
    std::vector<float> r(n);
    for (size_t i = 0; i < n; i++) r[i] = bf2f(p[i]);
    return r;
}

static void check(const std::string& name, const std::vector<float>& got,
                  const std::vector<float>& ref, bool bf16_out, float floor) {
    float err = 0, e16 = 0, scale = 1e-30f;
    for (size_t i = 0; i < ref.size(); i++) {
        const float d = std::isfinite(got[i]) ? fabsf(got[i] - ref[i]) : INFINITY;
        err = std::max(err, d);
        if (bf16_out) e16 = std::max(e16, fabsf(r16(ref[i]) - ref[i]));
        scale = std::max(scale, fabsf(ref[i]));
    }
    const float bound = 2 * e16 + floor * scale + 1e-6f;
    const bool ok = err <= bound;
    printf("%-46s max_abs %10.3e  rel %10.3e  bound %10.3e  %s\n", name.c_str(), err, err / scale,
           bound, ok ? "ok" : "FAIL");
    (ok ? g_pass : g_fail)++;
}

#define LAUNCH(grid, threads, ...) emu::launch(dim3e{(unsigned)(grid), 1, 1}, threads, [&] { __VA_ARGS__; })

static float sigm(float x) { return 1.f / (1.f + expf(-x)); }

static void test_elementwise(Rng& r) {
    for (int off : {0, 1}) {
        for (long n : {1000L, 1003L}) {
            auto a = r.vec(n, 2), b = r.vec(n, 2), d = r.vec(n, 1);
            auto A = to16(a), B = to16(b), D = to16(d);
            std::vector<bf16> O(n + 8), G(n + 8), U(n + 8);
            std::string tag = " n " + std::to_string(n) + " off " + std::to_string(off);
            const long m = n - off;
            LAUNCH(2, 64, add_bf16(O.data() + off, A.data() + off, B.data() + off, m));
            std::vector<float> ref(m), got = from16(O.data() + off, m);
            for (long i = 0; i < m; i++) ref[i] = a[i + off] + b[i + off];
            check("add" + tag, got, ref, true, 0);
            LAUNCH(2, 64, swiglu_fwd_bf16(O.data() + off, A.data() + off, B.data() + off, m));
            for (long i = 0; i < m; i++) {
                const float g = a[i + off];
                ref[i] = g * sigm(g) * b[i + off];
            }
            check("swiglu_fwd" + tag, from16(O.data() + off, m), ref, true, 1e-6f);
            LAUNCH(3, 32, swiglu_bwd_bf16(G.data() + off, U.data() + off, D.data() + off,
                                          A.data() + off, B.data() + off, m));
            std::vector<float> rg(m), ru(m);
            for (long i = 0; i < m; i++) {
                const float dd = d[i + off], g = a[i + off], u = b[i + off], s = sigm(g);
                ru[i] = dd * g * s;
                rg[i] = dd * u * s * (1 + g * (1 - s));
            }
            check("swiglu_bwd dgate" + tag, from16(G.data() + off, m), rg, true, 1e-6f);
            check("swiglu_bwd dup" + tag, from16(U.data() + off, m), ru, true, 1e-6f);
            auto f = r.vec(n, 3, false);
            LAUNCH(2, 64, f32_to_bf16(O.data() + off, f.data() + off, m));
            for (long i = 0; i < m; i++) ref[i] = r16(f[i + off]);
            check("f32_to_bf16" + tag, from16(O.data() + off, m), ref, false, 0);
        }
    }
    for (long w : {16L, 13L}) {
        const long nsrc = 40, nr = 9;
        auto src = r.vec(nsrc * w, 1);
        auto S = to16(src);
        std::vector<int32_t> rows(nr), distinct(nr);
        for (long i = 0; i < nr; i++) rows[i] = (int32_t)((i * 7) % nsrc), distinct[i] = (int32_t)(3 * i + 1);
        std::vector<bf16> D(nr * w + 8);
        LAUNCH(4, 32, gather_rows_bf16(D.data(), S.data(), rows.data(), nr, w));
        std::vector<float> ref(nr * w);
        for (long i = 0; i < nr; i++)
            for (long c = 0; c < w; c++) ref[i * w + c] = src[rows[i] * w + c];
        check("gather_rows w " + std::to_string(w), from16(D.data(), nr * w), ref, false, 0);
        std::vector<bf16> C(nsrc * w + 8, f2bf(0.f));
        LAUNCH(4, 32, scatter_rows_bf16(C.data(), D.data(), distinct.data(), nr, w));
        std::vector<float> rc(nsrc * w, 0.f);
        for (long i = 0; i < nr; i++)
            for (long c = 0; c < w; c++) rc[distinct[i] * w + c] = ref[i * w + c];
        check("scatter_rows w " + std::to_string(w), from16(C.data(), nsrc * w), rc, false, 0);
    }
}

static void test_rmsnorm(Rng& r) {
    for (long h : {64L, 37L}) {
        const long n = 11;
        const float eps = 1e-5f;
        auto x = r.vec(n * h, 3), w = r.vec(h, 1), dout = r.vec(n * h, 1), dx0 = r.vec(n * h, 0.5),
             dw0 = r.vec(h, 0.5, false);
        for (auto& v : w) v = r16(v + 1.5f);
        auto X = to16(x), W = to16(w), DO = to16(dout), DX = to16(dx0);
        std::vector<bf16> O(n * h + 8);
        std::vector<float> rstd(n);
        LAUNCH(4, 64, rmsnorm_fwd_bf16(O.data(), rstd.data(), X.data(), W.data(), n, h, eps));
        std::vector<float> ro(n * h), rr(n);
        for (long i = 0; i < n; i++) {
            float ss = 0;
            for (long j = 0; j < h; j++) ss += x[i * h + j] * x[i * h + j];
            rr[i] = 1.f / sqrtf(ss / h + eps);
            for (long j = 0; j < h; j++) ro[i * h + j] = w[j] * (x[i * h + j] * rr[i]);
        }
        const std::string tag = " h " + std::to_string(h);
        check("rmsnorm_fwd out" + tag, from16(O.data(), n * h), ro, true, 1e-6f);
        check("rmsnorm_fwd rstd" + tag, rstd, rr, false, 1e-5f);
        // Backward: 3 rows per block -> 4 partials.
        const long per = 3, parts = (n + per - 1) / per;
        std::vector<float> part(parts * h, NAN), dw = dw0;
        LAUNCH(parts, 64, rmsnorm_bwd_bf16(DX.data(), part.data(), DO.data(), X.data(), W.data(),
                                           rr.data(), n, h, per));
        LAUNCH(1, 32, rmsnorm_dw_reduce(dw.data(), part.data(), parts, h));
        std::vector<float> rdx = dx0, rdw = dw0;
        for (long i = 0; i < n; i++) {
            float dot = 0;
            for (long j = 0; j < h; j++) {
                const float xh = x[i * h + j] * rr[i];
                rdw[j] += dout[i * h + j] * xh;
                dot += dout[i * h + j] * w[j] * xh;
            }
            const float mean = dot / h;
            for (long j = 0; j < h; j++) {
                const float xh = x[i * h + j] * rr[i];
                rdx[i * h + j] += rr[i] * (dout[i * h + j] * w[j] - xh * mean);
            }
        }
        check("rmsnorm_bwd dx" + tag, from16(DX.data(), n * h), rdx, true, 1e-5f);
        check("rmsnorm_bwd dw" + tag, dw, rdw, false, 1e-5f);
    }
}

static void test_rope(Rng& r) {
    const long n = 7, heads = 3;
    for (long hd : {16L, 128L}) {
        std::vector<int32_t> pos(n);
        for (long i = 0; i < n; i++) pos[i] = (int32_t)(i * 97 % 613);
        for (int fwd : {1, 0}) {
            auto x = r.vec(n * heads * hd, 2);
            auto X = to16(x);
            if (fwd)
                LAUNCH(3, 64, rope_fwd_bf16(X.data(), pos.data(), n, heads, hd, 10000.f));
            else
                LAUNCH(3, 64, rope_bwd_bf16(X.data(), pos.data(), n, heads, hd, 10000.f));
            std::vector<float> ref = x;
            const long half = hd / 2;
            for (long t = 0; t < n; t++)
                for (long i = 0; i < half; i++) {
                    const float inv = (float)(1.0 / pow(10000.0, (double)(2 * i) / hd));
                    const float ang = pos[t] * inv;
                    const float s = sinf(ang) * (fwd ? 1.f : -1.f), c = cosf(ang);
                    for (long hh = 0; hh < heads; hh++) {
                        const long b = t * heads * hd + hh * hd;
                        const float a = x[b + i], bb = x[b + i + half];
                        ref[b + i] = a * c - bb * s;
                        ref[b + i + half] = bb * c + a * s;
                    }
                }
            check(std::string(fwd ? "rope_fwd" : "rope_bwd") + " hd " + std::to_string(hd),
                  from16(X.data(), n * heads * hd), ref, true, 1e-5f);
        }
    }
}

static void test_softmax(Rng& r) {
    for (long V : {1000L, 1001L, 40L}) {
        const long n = 5;
        auto lg = r.vec(n * V, 8);
        std::vector<int32_t> tg(n);
        for (long i = 0; i < n; i++) tg[i] = i == 2 ? -100 : (int32_t)((i * 131 + 7) % V);
        auto L = to16(lg);
        const std::string tag = " V " + std::to_string(V);
        // reference row statistics
        std::vector<float> m(n), s(n), sx(n);
        for (long i = 0; i < n; i++) {
            float mm = -INFINITY;
            for (long j = 0; j < V; j++) mm = std::max(mm, lg[i * V + j]);
            float ss = 0, sxx = 0;
            for (long j = 0; j < V; j++) {
                const float e = expf(lg[i * V + j] - mm);
                ss += e;
                sxx += e * (lg[i * V + j] - mm);
            }
            m[i] = mm, s[i] = ss, sx[i] = sxx;
        }
        std::vector<float> loss(n, NAN), rl(n);
        LAUNCH(2, 1024, cross_entropy_fwd_bf16(loss.data(), L.data(), tg.data(), n, V));
        for (long i = 0; i < n; i++) rl[i] = tg[i] < 0 ? 0 : m[i] + logf(s[i]) - lg[i * V + tg[i]];
        check("cross_entropy_fwd" + tag, loss, rl, false, 1e-5f);
        std::vector<float> lp(n, NAN), en(n, NAN), rlp(n), ren(n);
        LAUNCH(3, 128, logprob_fwd_bf16(lp.data(), en.data(), L.data(), tg.data(), n, V));
        for (long i = 0; i < n; i++) {
            rlp[i] = tg[i] < 0 ? 0 : lg[i * V + tg[i]] - m[i] - logf(s[i]);
            ren[i] = tg[i] < 0 ? 0 : logf(s[i]) - sx[i] / s[i];
        }
        check("logprob_fwd logp" + tag, lp, rlp, false, 1e-5f);
        check("logprob_fwd entropy" + tag, en, ren, false, 1e-5f);
        const float scale = 0.25f;
        auto D = to16(lg);
        LAUNCH(2, 256, cross_entropy_bwd_bf16(D.data(), tg.data(), n, V, scale));
        std::vector<float> rd(n * V);
        for (long i = 0; i < n; i++)
            for (long j = 0; j < V; j++)
                rd[i * V + j] = tg[i] < 0 ? 0
                                          : expf(lg[i * V + j] - m[i]) * (scale / s[i]) -
                                                (j == tg[i] ? scale : 0);
        check("cross_entropy_bwd" + tag, from16(D.data(), n * V), rd, true, 1e-6f);
        std::vector<float> wt = {0.5f, -1.f, 2.f, 0.f, 1.5f};
        auto P = to16(lg);
        LAUNCH(2, 1024, logprob_bwd_bf16(P.data(), tg.data(), wt.data(), n, V));
        for (long i = 0; i < n; i++)
            for (long j = 0; j < V; j++)
                rd[i * V + j] = (tg[i] < 0 || wt[i] == 0)
                                    ? 0
                                    : expf(lg[i * V + j] - m[i]) * (-wt[i] / s[i]) +
                                          (j == tg[i] ? wt[i] : 0);
        check("logprob_bwd" + tag, from16(P.data(), n * V), rd, true, 1e-6f);
    }
}

static void test_adamw_reduce(Rng& r) {
    const long n = 1003;
    auto p0 = r.vec(n, 0.1f, false), m0 = r.vec(n, 0.01f, false), g = r.vec(n, 0.1f, false);
    std::vector<float> v0(n);
    for (auto& x : v0) x = r.uni(0, 1e-4f);
    const float lr = 3e-4f, b1 = 0.9f, b2 = 0.95f, eps = 1e-5f, wd = 0.1f, gs = 0.5f;
    const int step = 7;
    const double bc1 = 1.0 - pow((double)b1, step), bc2 = 1.0 - pow((double)b2, step);
    const float step_size = (float)(lr / bc1), bc2s = (float)sqrt(bc2), decay = 1.0f - lr * wd;
    for (int off : {0, 3}) {
        auto p = p0, m = m0, v = v0;
        std::vector<bf16> sh(n + 8);
        LAUNCH(3, 64, adamw_f32(p.data() + off, sh.data() + off, m.data() + off, v.data() + off,
                                g.data() + off, n - off, b1, 1.0f - b1, b2, 1.0f - b2, eps, decay,
                                step_size, bc2s, gs));
        auto rp = p0, rm = m0, rv = v0;
        for (long i = off; i < n; i++) {
            const float gg = g[i] * gs;
            rp[i] *= decay;
            rm[i] = b1 * rm[i] + (1.0f - b1) * gg;
            rv[i] = b2 * rv[i] + (1.0f - b2) * gg * gg;
            const float denom = sqrtf(rv[i]) / bc2s + eps;
            rp[i] -= step_size * rm[i] / denom;
        }
        const std::string tag = " off " + std::to_string(off);
        check("adamw master (bitwise)" + tag, p, rp, false, 0);
        check("adamw m (bitwise)" + tag, m, rm, false, 0);
        check("adamw v (bitwise)" + tag, v, rv, false, 0);
        std::vector<float> rsh(n - off);
        for (long i = off; i < n; i++) rsh[i - off] = r16(rp[i]);
        check("adamw shadow" + tag, from16(sh.data() + off, n - off), rsh, false, 0);
    }
    for (long len : {1L, 1001L, 70000L}) {
        auto x = r.vec(len, 1, false);
        std::vector<double> buf(1025);
        const long parts = std::min(1024L, std::max(1L, (len + 4095) / 4096));
        double ref2 = 0, ref1 = 0;
        for (float f : x) ref2 += (double)f * f, ref1 += f;
        for (int sq : {1, 0}) {
            LAUNCH(parts, 64, reduce_sum_f32(buf.data() + 1, x.data() + (len > 1 ? 1 : 0),
                                             len > 1 ? len - 1 : len, sq));
            LAUNCH(1, 128, reduce_finish_f64(buf.data(), buf.data() + 1, parts));
            double want = 0;
            for (long i = (len > 1 ? 1 : 0); i < len; i++) want += sq ? (double)x[i] * x[i] : x[i];
            const bool ok = fabs(buf[0] - want) <= 1e-9 * std::max(1.0, fabs(ref2));
            printf("%-46s %.12g vs %.12g  %s\n",
                   (std::string(sq ? "sum_squares" : "sum") + " len " + std::to_string(len)).c_str(),
                   buf[0], want, ok ? "ok" : "FAIL");
            (ok ? g_pass : g_fail)++;
        }
        (void)ref1;
    }
}

static void test_embedding_scalar_head(Rng& r) {
    for (long h : {24L, 13L}) {
        const long n = 20, V = 9;
        std::vector<int32_t> ids(n);
        for (long i = 0; i < n; i++) ids[i] = (int32_t)((i * i + 3) % V);
        auto dout = r.vec(n * h, 1);
        auto DO = to16(dout);
        auto dw0 = r.vec(V * h, 0.1f, false);
        // the host plan, as ops.rs's embedding_bwd in cuda/ops.rs builds it
        std::vector<int32_t> order(n);
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](int a, int b) {
            return ids[a] != ids[b] ? ids[a] < ids[b] : a < b;
        });
        std::vector<int32_t> seg, segid;
        for (long k = 0; k < n; k++)
            if (segid.empty() || segid.back() != ids[order[k]]) seg.push_back((int32_t)k), segid.push_back(ids[order[k]]);
        seg.push_back((int32_t)n);
        auto dw = dw0;
        LAUNCH(2, 32, embedding_bwd_bf16(dw.data(), DO.data(), order.data(), seg.data(), segid.data(),
                                         (long)segid.size(), h));
        auto rdw = dw0;
        for (long t = 0; t < n; t++)
            for (long j = 0; j < h; j++) rdw[ids[t] * h + j] += dout[t * h + j];
        check("embedding_bwd h " + std::to_string(h), dw, rdw, false, 1e-6f);

        // scalar head
        auto hh = r.vec(n * h, 1), w = r.vec(h, 0.1f), dh0 = r.vec(n * h, 0.1f);
        auto H = to16(hh), W = to16(w), DH = to16(dh0);
        std::vector<int32_t> rows = {3, 19, 7, 19};
        std::vector<float> out(4, NAN), rout(4), gout = {0.5f, -1.f, 2.f, 0.25f};
        LAUNCH(2, 64, scalar_head_fwd_bf16(out.data(), H.data(), W.data(), rows.data(), 4, h));
        for (int i = 0; i < 4; i++) {
            float a = 0;
            for (long j = 0; j < h; j++) a += hh[rows[i] * h + j] * w[j];
            rout[i] = a;
        }
        check("scalar_head_fwd h " + std::to_string(h), out, rout, false, 1e-5f);
        auto gw = dw0;
        gw.resize(h);
        auto rgw = gw;
        auto rdh = dh0;
        LAUNCH(1, 32, scalar_head_bwd_bf16(DH.data(), gw.data(), gout.data(), H.data(), W.data(),
                                           rows.data(), 4, h));
        for (int i = 0; i < 4; i++)
            for (long j = 0; j < h; j++) {
                rdh[rows[i] * h + j] += gout[i] * w[j];
                rgw[j] += gout[i] * hh[rows[i] * h + j];
            }
        check("scalar_head_bwd dh h " + std::to_string(h), from16(DH.data(), n * h), rdh, true, 1e-2f);
        check("scalar_head_bwd dw h " + std::to_string(h), gw, rgw, false, 1e-5f);
    }
}

int main() {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    Rng r{42};
    test_elementwise(r);
    test_rmsnorm(r);
    test_rope(r);
    test_softmax(r);
    test_adamw_reduce(r);
    test_embedding_scalar_head(r);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
