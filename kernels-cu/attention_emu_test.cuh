// CPU correctness test of attention.cu: runs the real kernel source under the emulation of
// attention_emu.cuh and compares with a double-precision port of engine/src/ops.rs
// (attention_fwd, attention_bwd, attention_cached). Not part of the PTX build (a .cuh).
//
//   g++ -std=c++20 -O2 -DATTN_HOST_EMU -x c++ kernels-cu/attention_emu_test.cuh \
//       -o /tmp/attn_emu && /tmp/attn_emu [quick|smoke]
//
// Exit status 0 when every case is within tolerance.

#ifndef ATTN_HOST_EMU
#error "build with -DATTN_HOST_EMU (see the comment at the top)"
#endif

#include "attention.cu"

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

namespace test {

using std::vector;

struct Dims {
    int b, t, nh, nkv, hd;
};

vector<bf16> to_bf16(const vector<float>& x) {
    vector<bf16> r(x.size());
    for (size_t i = 0; i < x.size(); ++i) r[i] = __float2bfloat16(x[i]);
    return r;
}
vector<float> to_f32(const vector<bf16>& x) {
    vector<float> r(x.size());
    for (size_t i = 0; i < x.size(); ++i) r[i] = __bfloat162float(x[i]);
    return r;
}
vector<float> randv(size_t n, std::mt19937& rng, float sd) {
    std::normal_distribution<float> nd(0.f, sd);
    vector<float> r(n);
    for (auto& x : r) x = __bfloat162float(__float2bfloat16(nd(rng)));  // exactly representable
    return r;
}

bool allowed(const int* doc, int bi, int t, int i, int j) {
    return j <= i && (!doc || doc[bi * t + j] == doc[bi * t + i]);
}

// ops::attention_fwd in double
void ref_fwd(vector<float>& out, vector<float>& lse, const vector<float>& q, const vector<float>& k,
             const vector<float>& v, const int* doc, Dims d) {
    const int group = d.nh / d.nkv;
    const double scale = 1.0 / std::sqrt((double)d.hd);
    out.assign((size_t)d.b * d.t * d.nh * d.hd, 0.f);
    lse.assign((size_t)d.b * d.t * d.nh, 0.f);
    vector<double> s(d.t);
    for (int bi = 0; bi < d.b; ++bi)
        for (int h = 0; h < d.nh; ++h) {
            const int g = h / group;
            for (int i = 0; i < d.t; ++i) {
                const float* qi = &q[(((size_t)bi * d.t + i) * d.nh + h) * d.hd];
                double m = -INFINITY;
                for (int j = 0; j < d.t; ++j) {
                    if (!allowed(doc, bi, d.t, i, j)) continue;
                    const float* kj = &k[(((size_t)bi * d.t + j) * d.nkv + g) * d.hd];
                    double acc = 0;
                    for (int e = 0; e < d.hd; ++e) acc += (double)qi[e] * kj[e];
                    s[j] = acc * scale;
                    m = std::max(m, s[j]);
                }
                double sum = 0;
                for (int j = 0; j < d.t; ++j)
                    if (allowed(doc, bi, d.t, i, j)) sum += std::exp(s[j] - m);
                float* oi = &out[(((size_t)bi * d.t + i) * d.nh + h) * d.hd];
                for (int e = 0; e < d.hd; ++e) {
                    double acc = 0;
                    for (int j = 0; j < d.t; ++j)
                        if (allowed(doc, bi, d.t, i, j))
                            acc += std::exp(s[j] - m) / sum *
                                   v[(((size_t)bi * d.t + j) * d.nkv + g) * d.hd + e];
                    oi[e] = (float)acc;
                }
                lse[((size_t)bi * d.t + i) * d.nh + h] = (float)(m + std::log(sum));
            }
        }
}

// ops::attention_bwd in double (dk, dv summed over the group)
void ref_bwd(vector<float>& dq, vector<float>& dk, vector<float>& dv, const vector<float>& dout,
             const vector<float>& q, const vector<float>& k, const vector<float>& v,
             const vector<float>& out, const vector<float>& lse, const int* doc, Dims d) {
    const int group = d.nh / d.nkv;
    const double scale = 1.0 / std::sqrt((double)d.hd);
    dq.assign(q.size(), 0.f);
    vector<double> dkd(k.size(), 0.0), dvd(k.size(), 0.0);
    for (int bi = 0; bi < d.b; ++bi)
        for (int h = 0; h < d.nh; ++h) {
            const int g = h / group;
            for (int i = 0; i < d.t; ++i) {
                const size_t qo = (((size_t)bi * d.t + i) * d.nh + h) * d.hd;
                double D = 0;
                for (int e = 0; e < d.hd; ++e) D += (double)dout[qo + e] * out[qo + e];
                const double L = lse[((size_t)bi * d.t + i) * d.nh + h];
                vector<double> dqi(d.hd, 0.0);
                for (int j = 0; j <= i; ++j) {
                    if (!allowed(doc, bi, d.t, i, j)) continue;
                    const size_t ko = (((size_t)bi * d.t + j) * d.nkv + g) * d.hd;
                    double s = 0, dp = 0;
                    for (int e = 0; e < d.hd; ++e) {
                        s += (double)q[qo + e] * k[ko + e];
                        dp += (double)dout[qo + e] * v[ko + e];
                    }
                    const double p = std::exp(s * scale - L);
                    const double ds = p * (dp - D);
                    for (int e = 0; e < d.hd; ++e) {
                        dvd[ko + e] += p * dout[qo + e];
                        dkd[ko + e] += scale * ds * q[qo + e];
                        dqi[e] += scale * ds * k[ko + e];
                    }
                }
                for (int e = 0; e < d.hd; ++e) dq[qo + e] = (float)dqi[e];
            }
        }
    dk.resize(k.size());
    dv.resize(k.size());
    for (size_t i = 0; i < k.size(); ++i) {
        dk[i] = (float)dkd[i];
        dv[i] = (float)dvd[i];
    }
}

// ops::attention_cached in double
void ref_cached(vector<float>& out, const vector<float>& q, const vector<float>& kc,
                const vector<float>& vc, const vector<int>& qpos, int b, int tq, int tmax, int nh,
                int nkv, int hd) {
    const int group = nh / nkv;
    const double scale = 1.0 / std::sqrt((double)hd);
    out.assign((size_t)b * tq * nh * hd, 0.f);
    for (int r = 0; r < b * tq; ++r) {
        const int seq = r / tq, p = qpos[r];
        const size_t base = (size_t)seq * tmax * nkv * hd;
        for (int h = 0; h < nh; ++h) {
            const int g = h / group;
            const float* qv = &q[((size_t)r * nh + h) * hd];
            vector<double> s(p + 1);
            double m = -INFINITY;
            for (int j = 0; j <= p; ++j) {
                double acc = 0;
                for (int e = 0; e < hd; ++e) acc += (double)qv[e] * kc[base + ((size_t)j * nkv + g) * hd + e];
                s[j] = acc * scale;
                m = std::max(m, s[j]);
            }
            double sum = 0;
            for (int j = 0; j <= p; ++j) sum += std::exp(s[j] - m);
            for (int e = 0; e < hd; ++e) {
                double acc = 0;
                for (int j = 0; j <= p; ++j)
                    acc += std::exp(s[j] - m) / sum * vc[base + ((size_t)j * nkv + g) * hd + e];
                out[((size_t)r * nh + h) * hd + e] = (float)acc;
            }
        }
    }
}

int failures = 0;

// max |got − want| / max(|want|) over the tensor (the max floored at 0.01: a zero reference, as
// dq and dk at t = 1, allows rounding noise), and no non-finite value
void check(const char* what, const vector<float>& got, const vector<float>& want, double tol) {
    double maxerr = 0, maxref = 0;
    bool finite = true;
    size_t worst = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (!std::isfinite(got[i])) finite = false;
        const double e = std::fabs((double)got[i] - want[i]);
        if (e > maxerr) {
            maxerr = e;
            worst = i;
        }
        maxref = std::max(maxref, std::fabs((double)want[i]));
    }
    const double rel = maxerr / std::max(maxref, 1e-2);
    const bool ok = finite && rel <= tol && got.size() == want.size();
    printf("  %-34s max|err| %.3e  max|ref| %.3e  rel %.2e  %s", what, maxerr, maxref, rel,
           ok ? "ok" : "FAIL");
    if (!ok)
        printf("  (worst at %zu: got %g want %g%s)", worst, got.empty() ? 0.0 : got[worst],
               want.empty() ? 0.0 : want[worst], finite ? "" : ", non-finite values");
    printf("\n");
    if (!ok) ++failures;
}

vector<int> make_doc(int b, int t, const vector<vector<int>>& runs) {
    // per sequence: run lengths; ids 0, 1, ...; the rest of the row is padding (-1)
    vector<int> doc((size_t)b * t, -1);
    for (int bi = 0; bi < b; ++bi) {
        int pos = 0, id = 0;
        for (int len : runs[bi % runs.size()]) {
            for (int i = 0; i < len && pos < t; ++i) doc[(size_t)bi * t + pos++] = id;
            ++id;
        }
    }
    return doc;
}

void run_case(Dims d, bool with_doc, bool fast, bool early_copy, uint32_t seed) {
    printf("case b=%d t=%d nh=%d nkv=%d hd=%d doc=%d path=%s copies=%s\n", d.b, d.t, d.nh, d.nkv,
           d.hd, (int)with_doc, fast ? "fast" : "naive", early_copy ? "early" : "late");
    emu::g_early_copy = early_copy;
    std::mt19937 rng(seed);
    const size_t nq = (size_t)d.b * d.t * d.nh * d.hd, nk = (size_t)d.b * d.t * d.nkv * d.hd;
    auto q = randv(nq, rng, 1.5f), k = randv(nk, rng, 1.f), v = randv(nk, rng, 1.f);
    auto dout = randv(nq, rng, 1.f);
    vector<int> doc;
    if (with_doc) doc = make_doc(d.b, d.t, {{37, 70, 20}, {10, 100, 64, 5}, {1, 1, 200}});
    const int* docp = with_doc ? doc.data() : nullptr;

    vector<float> out_ref, lse_ref;
    ref_fwd(out_ref, lse_ref, q, k, v, docp, d);
    auto qb = to_bf16(q), kb = to_bf16(k), vb = to_bf16(v), dob = to_bf16(dout);
    const float scale = 1.f / std::sqrt((float)d.hd);
    const i64 B = d.b, T = d.t, NH = d.nh, NKV = d.nkv, HD = d.hd;

    // ---- forward ----
    vector<bf16> out(nq, __float2bfloat16(NAN));
    vector<float> lse((size_t)d.b * d.t * d.nh, NAN);
    if (fast) {
        const unsigned gx = (d.t + 63) / 64;
        emu::launch({gx, (unsigned)d.nh, (unsigned)d.b}, 128, [&] {
            if (d.hd == 64)
                attention_fwd_bf16_hd64(out.data(), lse.data(), qb.data(), kb.data(), vb.data(),
                                        docp, B, T, NH, NKV, scale);
            else
                attention_fwd_bf16_hd128(out.data(), lse.data(), qb.data(), kb.data(), vb.data(),
                                         docp, B, T, NH, NKV, scale);
        });
    } else {
        emu::launch({(unsigned)d.t, (unsigned)d.nh, (unsigned)d.b}, 128, [&] {
            attention_fwd_naive_bf16(out.data(), lse.data(), qb.data(), kb.data(), vb.data(), docp,
                                     B, T, NH, NKV, HD, scale);
        });
    }
    check("fwd out", to_f32(out), out_ref, 1.5e-2);
    {
        double maxerr = 0;
        for (size_t i = 0; i < lse.size(); ++i)
            maxerr = std::max(maxerr, std::fabs((double)lse[i] - lse_ref[i]));
        const bool ok = maxerr < 2e-3;
        printf("  %-34s max|err| %.3e  %s\n", "fwd lse (abs)", maxerr, ok ? "ok" : "FAIL");
        if (!ok) ++failures;
    }

    // ---- backward (from the reference out, rounded to bf16, and lse) ----
    auto outb = to_bf16(out_ref);
    auto out_r = to_f32(outb);
    vector<float> dq_ref, dk_ref, dv_ref;
    ref_bwd(dq_ref, dk_ref, dv_ref, dout, q, k, v, out_r, lse_ref, docp, d);
    vector<float> dsum((size_t)d.b * d.t * d.nh, NAN);
    const i64 rows = (i64)dsum.size();
    emu::launch({(unsigned)((rows + 7) / 8), 1, 1}, 256, [&] {
        attention_bwd_preprocess_bf16(dsum.data(), dob.data(), outb.data(), rows, HD);
    });
    vector<bf16> dq(nq, __float2bfloat16(NAN)), dk(nk, __float2bfloat16(NAN)),
        dv(nk, __float2bfloat16(NAN));
    if (fast) {
        vector<float> acc(nq, 0.f);
        const unsigned gx = (d.t + 127) / 128;
        emu::launch({gx, (unsigned)d.nkv, (unsigned)d.b}, 256, [&] {
            if (d.hd == 64)
                attention_bwd_bf16_hd64(acc.data(), dk.data(), dv.data(), dob.data(), qb.data(),
                                        kb.data(), vb.data(), lse_ref.data(), dsum.data(), docp, B,
                                        T, NH, NKV, scale);
            else
                attention_bwd_bf16_hd128(acc.data(), dk.data(), dv.data(), dob.data(), qb.data(),
                                         kb.data(), vb.data(), lse_ref.data(), dsum.data(), docp,
                                         B, T, NH, NKV, scale);
        });
        emu::launch({3, 1, 1}, 256, [&] {
            attention_bwd_dq_convert_bf16(dq.data(), acc.data(), (i64)nq, scale);
        });
    } else {
        emu::launch({(unsigned)d.t, (unsigned)d.nh, (unsigned)d.b}, 128, [&] {
            attention_bwd_naive_dq_bf16(dq.data(), dob.data(), qb.data(), kb.data(), vb.data(),
                                        lse_ref.data(), dsum.data(), docp, B, T, NH, NKV, HD,
                                        scale);
        });
        emu::launch({(unsigned)d.t, (unsigned)d.nkv, (unsigned)d.b}, 128, [&] {
            attention_bwd_naive_dkdv_bf16(dk.data(), dv.data(), dob.data(), qb.data(), kb.data(),
                                          vb.data(), lse_ref.data(), dsum.data(), docp, B, T, NH,
                                          NKV, HD, scale);
        });
    }
    check("bwd dq", to_f32(dq), dq_ref, 2e-2);
    check("bwd dk", to_f32(dk), dk_ref, 2e-2);
    check("bwd dv", to_f32(dv), dv_ref, 2e-2);
}

void run_cached(int b, int tq, int tmax, int nh, int nkv, int hd, uint32_t seed) {
    printf("cached b=%d tq=%d tmax=%d nh=%d nkv=%d hd=%d\n", b, tq, tmax, nh, nkv, hd);
    std::mt19937 rng(seed);
    const int bcache = b + 1;  // one spare slot
    auto q = randv((size_t)b * tq * nh * hd, rng, 1.5f);
    auto kc = randv((size_t)bcache * tmax * nkv * hd, rng, 1.f);
    auto vc = randv((size_t)bcache * tmax * nkv * hd, rng, 1.f);
    vector<int> qpos(b * tq);
    std::uniform_int_distribution<int> ud(0, tmax - tq);
    for (int s = 0; s < b; ++s) {
        const int start = ud(rng);
        for (int i = 0; i < tq; ++i) qpos[s * tq + i] = start + i;
    }
    qpos[0] = 0;  // a row that sees a single key
    vector<float> ref;
    ref_cached(ref, q, kc, vc, qpos, b, tq, tmax, nh, nkv, hd);
    auto qb = to_bf16(q), kb = to_bf16(kc), vb = to_bf16(vc);
    vector<bf16> out(q.size(), __float2bfloat16(NAN));
    const float scale = 1.f / std::sqrt((float)hd);
    emu::launch({(unsigned)(b * tq), (unsigned)nh, 1}, 256, [&] {
        attention_cached_bf16(out.data(), qb.data(), kb.data(), vb.data(), qpos.data(), b, tq,
                              tmax, nh, nkv, hd, scale);
    });
    check("cached out", to_f32(out), ref, 1.5e-2);
}

}  // namespace test

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    // modes: (none) everything; quick: no early-copy runs; smoke: the fast path with doc only
    const std::string mode = argc > 1 ? argv[1] : "";
    const bool quick = mode == "quick" || mode == "smoke";
    using test::Dims;
    uint32_t seed = 1;
    if (mode == "smoke") {
        test::run_case(Dims{2, 150, 4, 2, 64}, true, true, false, 1);
        test::run_case(Dims{2, 150, 4, 2, 128}, true, true, false, 2);
        printf(test::failures ? "FAILED: %d checks\n" : "all checks passed\n", test::failures);
        return test::failures ? 1 : 0;
    }
    // fast path: both head dims, GQA, doc, lengths off the tile grid, both cp.async orders
    for (int hd : {64, 128})
        for (bool doc : {false, true})
            for (bool early : {false, true}) {
                if (quick && early) continue;
                test::run_case(Dims{2, 150, 4, 2, hd}, doc, true, early, seed++);
            }
    if (!quick) {
        test::run_case(Dims{1, 64, 2, 2, 64}, false, true, false, seed++);     // one exact tile
        test::run_case(Dims{3, 260, 4, 1, 128}, true, true, false, seed++);   // group 4, 3 docs
        test::run_case(Dims{1, 17, 3, 3, 128}, false, true, true, seed++);    // tiny t
        test::run_case(Dims{2, 1, 2, 1, 64}, true, true, false, seed++);      // t = 1
    }
    // naive path (any head dim)
    for (int hd : {64, 80})
        for (bool doc : {false, true})
            test::run_case(Dims{2, 70, 4, 2, hd}, doc, false, false, seed++);
    // KV cache
    test::run_cached(2, 1, 50, 4, 2, 64, seed++);
    test::run_cached(2, 5, 70, 4, 1, 128, seed++);
    test::run_cached(1, 3, 40, 2, 2, 96, seed++);
    printf(test::failures ? "FAILED: %d checks\n" : "all checks passed\n", test::failures);
    return test::failures ? 1 : 0;
}
