//! Instruction semantics against values worked out from the PTX ISA: each test wraps one
//! instruction in a kernel (one thread per input) and compares bit patterns.

mod common;
use common::*;
use gpu_sim::ptx::Module;

/// Register class and load/store type of an operand type.
fn class(ty: &str) -> (&'static str, &'static str) {
    match ty {
        "f32" | "b32" | "u32" | "s32" => ("s", "b32"),
        "f64" | "b64" | "u64" | "s64" => ("x", "b64"),
        "b16" | "u16" | "s16" => ("y", "b16"),
        "pred" => ("p", "u32"),
        _ => panic!("type {ty}"),
    }
}

/// Runs `op` (with `{d}`, `{0}`, `{1}`, ... for the destination and sources) once per element
/// of the inputs; each input and the output are arrays of u64 holding the bits in their low
/// bytes.
fn eval(op: &str, dty: &str, stys: &[&str], inputs: &[Vec<u64>]) -> Vec<u64> {
    let n = inputs[0].len();
    let mut body = String::new();
    let mut text = op.to_string();
    for (k, ty) in stys.iter().enumerate() {
        let (c, lt) = class(ty);
        body += &format!(
            "ld.param.u64 %rd{a}, [p_in{k}];\nadd.s64 %rd{a}, %rd{a}, %rd0;\n",
            a = k + 1
        );
        if *ty == "pred" {
            body += &format!(
                "ld.global.u32 %s{k}, [%rd{a}];\nsetp.ne.u32 %p{k}, %s{k}, 0;\n",
                a = k + 1
            );
        } else {
            body += &format!("ld.global.{lt} %{c}{k}, [%rd{a}];\n", a = k + 1);
        }
        text = text.replace(&format!("{{{k}}}"), &format!("%{c}{k}"));
    }
    let (dc, dlt) = class(dty);
    text = text.replace("{d}", &format!("%{dc}3"));
    body += &text;
    body += ";\nld.param.u64 %rd9, [p_out];\nadd.s64 %rd9, %rd9, %rd0;\n";
    if dty == "pred" {
        body += "selp.u32 %s3, 1, 0, %p3;\nst.global.u32 [%rd9], %s3;\n";
    } else {
        body += &format!("st.global.{dlt} [%rd9], %{dc}3;\n");
    }
    let ptx = format!(
        "{HEAD}.visible .entry t(.param .u64 p_out, .param .u64 p_in0, .param .u64 p_in1, .param .u64 p_in2)\n{{\n\
         .reg .pred %p<4>;\n.reg .b16 %y<4>;\n.reg .b32 %s<4>;\n.reg .b64 %x<4>;\n.reg .b32 %r<2>;\n.reg .b64 %rd<10>;\n\
         mov.u32 %r0, %tid.x;\nmul.wide.u32 %rd0, %r0, 8;\n{body}ret;\n}}\n"
    );
    let m = Module::parse(&ptx).unwrap_or_else(|e| panic!("{e}\n{ptx}"));
    let k = m.kernel("t").unwrap();
    let dev = Dev::new();
    let bytes = |v: &Vec<u64>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut args = vec![dev.zeros(n * 8)];
    for i in 0..3 {
        args.push(dev.bytes(&bytes(inputs.get(i).unwrap_or(&inputs[0]))));
    }
    dev.launch(&k, [1, 1, 1], [n as u32, 1, 1], 0, &args, true)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = vec![0u8; n * 8];
    dev.mem.read(args[0], &mut out).unwrap();
    out.chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn f32s(v: &[f32]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits() as u64).collect()
}
fn u32s(v: &[u32]) -> Vec<u64> {
    v.iter().map(|x| *x as u64).collect()
}
fn as_u32(v: &[u64]) -> Vec<u32> {
    v.iter().map(|x| *x as u32).collect()
}
fn as_f32(v: &[u64]) -> Vec<f32> {
    v.iter().map(|x| f32::from_bits(*x as u32)).collect()
}

#[test]
fn cvt_rn_bf16_f32_rounds_to_nearest_even_keeps_nan_and_overflows_to_inf() {
    let cases: &[(u32, u16)] = &[
        (0x3f80_0000, 0x3f80), // 1.0
        (0x3f80_8000, 0x3f80), // tie, even below: down
        (0x3f81_8000, 0x3f82), // tie, odd below: up
        (0x3f80_8001, 0x3f81), // above the tie
        (0x3f80_7fff, 0x3f80), // below the tie
        (0xbf81_8000, 0xbf82), // negative tie rounds in magnitude to even
        (0x7f7f_ffff, 0x7f80), // f32::MAX overflows to +inf
        (0x7f7f_7fff, 0x7f7f), // just below: the largest finite bf16
        (0x7f80_0000, 0x7f80), // +inf
        (0xff80_0000, 0xff80), // -inf
        (0x8000_0000, 0x8000), // -0
        (0x0000_8000, 0x0000), // subnormal tie to even (0)
        (0x0001_8000, 0x0002), // subnormal tie to even (2)
        (0x0000_8001, 0x0001), // subnormals are kept, not flushed
    ];
    let input: Vec<u64> = cases.iter().map(|c| c.0 as u64).collect();
    let out = eval("cvt.rn.bf16.f32 {d}, {0}", "b16", &["f32"], &[input]);
    for (c, o) in cases.iter().zip(&out) {
        assert_eq!(*o as u16, c.1, "bf16({:#010x})", c.0);
    }
    // NaN stays NaN (any payload, either sign)
    let nans = u32s(&[0x7fc0_0000, 0x7f80_0001, 0xffc0_1234]);
    for o in eval("cvt.rn.bf16.f32 {d}, {0}", "b16", &["f32"], &[nans]) {
        let h = o as u16;
        assert!(h & 0x7f80 == 0x7f80 && h & 0x7f != 0, "NaN became {h:#06x}");
    }
}

#[test]
fn cvt_rn_bf16x2_puts_the_first_source_in_the_upper_half() {
    let a = f32s(&[1.0, -2.0, 3.0]);
    let b = f32s(&[2.0, 0.5, 1.0 + 1.0 / 256.0]);
    let out = eval(
        "cvt.rn.bf16x2.f32 {d}, {0}, {1}",
        "b32",
        &["f32", "f32"],
        &[a, b],
    );
    assert_eq!(as_u32(&out), vec![0x3f80_4000, 0xc000_3f00, 0x4040_3f80]);
}

#[test]
fn ex2_approx_ftz_flushes_subnormal_inputs_and_results() {
    let x = [
        0.0f32,
        1.0,
        -1.0,
        10.0,
        -126.0,
        -127.0,
        -140.0,
        128.0,
        f32::NEG_INFINITY,
        f32::INFINITY,
    ];
    let want = [
        1.0f32,
        2.0,
        0.5,
        1024.0,
        f32::MIN_POSITIVE,
        0.0,
        0.0,
        f32::INFINITY,
        0.0,
        f32::INFINITY,
    ];
    let out = as_f32(&eval(
        "ex2.approx.ftz.f32 {d}, {0}",
        "f32",
        &["f32"],
        &[f32s(&x)],
    ));
    for i in 0..x.len() {
        assert_eq!(out[i].to_bits(), want[i].to_bits(), "ex2({})", x[i]);
    }
    // a subnormal input is +-0: 2^0 = 1 exactly; without .ftz it would be 1 + tiny = 1 too,
    // so check the result side with the non-ftz form on a result that is subnormal
    let sub = u32s(&[0x0000_0001, 0x8040_0000]);
    let out = as_f32(&eval(
        "ex2.approx.ftz.f32 {d}, {0}",
        "f32",
        &["f32"],
        &[sub],
    ));
    assert_eq!(out, vec![1.0, 1.0]);
    let out = as_f32(&eval(
        "ex2.approx.f32 {d}, {0}",
        "f32",
        &["f32"],
        &[f32s(&[-127.0, -149.0])],
    ));
    assert_eq!(
        out[0].to_bits(),
        0x0040_0000,
        "2^-127 is subnormal and kept without .ftz"
    );
    assert_eq!(out[1].to_bits(), 0x0000_0001);
    // NaN and accuracy within the ISA's bound (2^-22 relative)
    let xs: Vec<f32> = (0..64).map(|i| -20.0 + i as f32 * 0.613).collect();
    let out = as_f32(&eval(
        "ex2.approx.ftz.f32 {d}, {0}",
        "f32",
        &["f32"],
        &[f32s(&xs)],
    ));
    for (x, y) in xs.iter().zip(&out) {
        let e = (*x as f64).exp2();
        assert!(
            ((*y as f64 - e) / e).abs() < 2f64.powi(-22),
            "ex2({x}) = {y}"
        );
    }
    let out = as_f32(&eval(
        "ex2.approx.ftz.f32 {d}, {0}",
        "f32",
        &["f32"],
        &[f32s(&[f32::NAN])],
    ));
    assert!(out[0].is_nan());
}

// ---- exact reference for directed rounding (integer arithmetic, independent of the
// simulator's float code) ----

/// x = m · 2^e exactly.
fn split(x: f32) -> (i128, i32) {
    let b = x.to_bits();
    let s = if b >> 31 != 0 { -1 } else { 1 };
    let ex = ((b >> 23) & 0xff) as i32;
    let fr = (b & 0x7f_ffff) as i128;
    if ex == 0 {
        (s * fr, -149)
    } else {
        (s * (fr | 1 << 23), ex - 150)
    }
}

/// Compares m1·2^e1 with m2·2^e2.
fn cmp_exact(m1: i128, e1: i32, m2: i128, e2: i32) -> std::cmp::Ordering {
    if e1 >= e2 {
        (m1 << (e1 - e2)).cmp(&m2)
    } else {
        m1.cmp(&(m2 << (e2 - e1)))
    }
}

fn next_up(x: f32) -> f32 {
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let b = x.to_bits();
    f32::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}
fn next_down(x: f32) -> f32 {
    -next_up(-x)
}

/// a·b + c rounded in `mode` ("rn", "rz", "rm", "rp"), for operands of moderate exponent.
fn fma_ref(a: f32, b: f32, c: f32, mode: &str) -> f32 {
    let (ma, ea) = split(a);
    let (mb, eb) = split(b);
    let (mc, ec) = split(c);
    let ep = ea + eb;
    // a zero term does not constrain the scale
    let e = if mc == 0 {
        ep
    } else if ma * mb == 0 {
        ec
    } else {
        ep.min(ec)
    };
    let n = if ma * mb == 0 {
        0
    } else {
        (ma * mb) << (ep - e)
    } + if mc == 0 { 0 } else { mc << (ec - e) };
    assert!(n != 0, "exact zero results are tested separately");
    let approx = ((n as f64) * 2f64.powi(e)) as f32;
    // lo <= exact <= hi, adjacent f32s
    let mut lo = approx;
    while {
        let (m, x) = split(lo);
        cmp_exact(m, x, n, e) == std::cmp::Ordering::Greater
    } {
        lo = next_down(lo);
    }
    loop {
        let up = next_up(lo);
        let (m, x) = split(up);
        if cmp_exact(m, x, n, e) == std::cmp::Ordering::Greater {
            break;
        }
        lo = up;
    }
    let (ml, xl) = split(lo);
    if cmp_exact(ml, xl, n, e) == std::cmp::Ordering::Equal {
        return lo;
    }
    let hi = next_up(lo);
    match mode {
        "rm" => lo,
        "rp" => hi,
        "rz" => {
            if n > 0 {
                lo
            } else {
                hi
            }
        }
        _ => {
            // 2·exact against lo + hi
            let (mh, xh) = split(hi);
            let x = xl.min(xh).min(e - 1);
            let sum = (ml << (xl - x)) + (mh << (xh - x));
            let twice = n << (e + 1 - x);
            match twice.cmp(&sum) {
                std::cmp::Ordering::Less => lo,
                std::cmp::Ordering::Greater => hi,
                std::cmp::Ordering::Equal => {
                    if lo.to_bits() & 1 == 0 {
                        lo
                    } else {
                        hi
                    }
                }
            }
        }
    }
}

fn rand_f32(s: &mut u64, lo_exp: i32, hi_exp: i32) -> f32 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    let sign = (*s >> 63) as u32;
    let exp = lo_exp + ((*s >> 32) % (hi_exp - lo_exp + 1) as u64) as i32;
    let frac = (*s & 0x7f_ffff) as u32;
    f32::from_bits(sign << 31 | ((exp + 127) as u32) << 23 | frac)
}

#[test]
fn fma_directed_rounding_is_the_exact_result_rounded_once() {
    // hand-worked: (1 + 2^-23)^2 = 1 + 2^-22 + 2^-46
    let a = f32::from_bits(0x3f80_0001);
    for (mode, want) in [
        ("rn", 0x3f80_0002u32),
        ("rz", 0x3f80_0002),
        ("rm", 0x3f80_0002),
        ("rp", 0x3f80_0003),
    ] {
        let out = eval(
            &format!("fma.{mode}.f32 {{d}}, {{0}}, {{1}}, {{2}}"),
            "f32",
            &["f32"; 3],
            &[f32s(&[a, -a]), f32s(&[a, a]), f32s(&[0.0, 0.0])],
        );
        assert_eq!(out[0] as u32, want, "fma.{mode} positive");
        let neg = match mode {
            "rm" => 0xbf80_0003,
            "rp" | "rz" => 0xbf80_0002,
            _ => 0xbf80_0002,
        };
        assert_eq!(out[1] as u32, neg, "fma.{mode} negative");
    }
    // random operands against the integer reference, every mode
    let mut s = 0x1234_5678_9abc_def1u64;
    let n = 256;
    let (mut av, mut bv, mut cv) = (vec![], vec![], vec![]);
    for _ in 0..n {
        av.push(rand_f32(&mut s, -8, 8));
        bv.push(rand_f32(&mut s, -8, 8));
        cv.push(rand_f32(&mut s, -16, 16));
    }
    for mode in ["rn", "rz", "rm", "rp"] {
        let out = as_f32(&eval(
            &format!("fma.{mode}.f32 {{d}}, {{0}}, {{1}}, {{2}}"),
            "f32",
            &["f32"; 3],
            &[f32s(&av), f32s(&bv), f32s(&cv)],
        ));
        for i in 0..n {
            let want = fma_ref(av[i], bv[i], cv[i], mode);
            assert_eq!(
                out[i].to_bits(),
                want.to_bits(),
                "fma.{mode}({}, {}, {}) = {} want {}",
                av[i],
                bv[i],
                cv[i],
                out[i],
                want
            );
        }
    }
    // an exact zero: +0, but -0 toward minus infinity
    let z = |mode: &str| {
        as_f32(&eval(
            &format!("fma.{mode}.f32 {{d}}, {{0}}, {{1}}, {{2}}"),
            "f32",
            &["f32"; 3],
            &[f32s(&[2.0]), f32s(&[3.0]), f32s(&[-6.0])],
        ))[0]
    };
    assert_eq!(z("rn").to_bits(), 0);
    assert_eq!(z("rm").to_bits(), 0x8000_0000);
}

#[test]
fn add_and_mul_with_rounding_modes() {
    let mut s = 0xfeed_beef_u64;
    let n = 128;
    let (mut av, mut bv) = (vec![], vec![]);
    for _ in 0..n {
        av.push(rand_f32(&mut s, -10, 10));
        bv.push(rand_f32(&mut s, -10, 10));
    }
    for mode in ["rn", "rz", "rm", "rp"] {
        let add = as_f32(&eval(
            &format!("add.{mode}.f32 {{d}}, {{0}}, {{1}}"),
            "f32",
            &["f32"; 2],
            &[f32s(&av), f32s(&bv)],
        ));
        let mul = as_f32(&eval(
            &format!("mul.{mode}.f32 {{d}}, {{0}}, {{1}}"),
            "f32",
            &["f32"; 2],
            &[f32s(&av), f32s(&bv)],
        ));
        for i in 0..n {
            assert_eq!(
                add[i].to_bits(),
                fma_ref(av[i], 1.0, bv[i], mode).to_bits(),
                "add.{mode}"
            );
            assert_eq!(
                mul[i].to_bits(),
                fma_ref(av[i], bv[i], 0.0, mode).to_bits(),
                "mul.{mode}"
            );
        }
    }
}

#[test]
fn min_max_return_the_non_nan_operand() {
    let nan = f32::NAN;
    let a = f32s(&[nan, 1.0, nan, -0.0, 0.0, -3.0]);
    let b = f32s(&[2.0, nan, nan, 0.0, -0.0, 5.0]);
    let mn = as_f32(&eval(
        "min.f32 {d}, {0}, {1}",
        "f32",
        &["f32"; 2],
        &[a.clone(), b.clone()],
    ));
    let mx = as_f32(&eval("max.f32 {d}, {0}, {1}", "f32", &["f32"; 2], &[a, b]));
    assert_eq!(mn[0], 2.0);
    assert_eq!(mn[1], 1.0);
    assert!(mn[2].is_nan());
    assert_eq!(mn[3].to_bits(), 0x8000_0000, "min(-0, +0) = -0");
    assert_eq!(mn[4].to_bits(), 0x8000_0000);
    assert_eq!(mn[5], -3.0);
    assert_eq!(mx[0], 2.0);
    assert_eq!(mx[1], 1.0);
    assert!(mx[2].is_nan());
    assert_eq!(mx[3].to_bits(), 0, "max(-0, +0) = +0");
    assert_eq!(mx[4].to_bits(), 0);
    assert_eq!(mx[5], 5.0);
}

#[test]
fn setp_ordered_and_unordered_comparisons() {
    let nan = f32::NAN;
    let a = f32s(&[nan, 1.0, 2.0, 1.0]);
    let b = f32s(&[1.0, nan, 1.0, 1.0]);
    let t = |cmp: &str| -> Vec<u64> {
        eval(
            &format!("setp.{cmp}.f32 {{d}}, {{0}}, {{1}}"),
            "pred",
            &["f32"; 2],
            &[a.clone(), b.clone()],
        )
    };
    //                        NaN<1  1<NaN  2?1  1?1
    assert_eq!(t("lt"), vec![0, 0, 0, 0]);
    assert_eq!(t("ltu"), vec![1, 1, 0, 0]);
    assert_eq!(t("ge"), vec![0, 0, 1, 1]);
    assert_eq!(t("geu"), vec![1, 1, 1, 1]);
    assert_eq!(t("ne"), vec![0, 0, 1, 0]);
    assert_eq!(t("neu"), vec![1, 1, 1, 0]);
    assert_eq!(t("eq"), vec![0, 0, 0, 1]);
    assert_eq!(t("equ"), vec![1, 1, 0, 1]);
    assert_eq!(t("leu"), vec![1, 1, 0, 1]);
    assert_eq!(t("gtu"), vec![1, 1, 1, 0]);
    assert_eq!(t("nan"), vec![1, 1, 0, 0]);
    assert_eq!(t("num"), vec![0, 0, 1, 1]);
    // signed against unsigned integer comparison
    let x = u32s(&[0xffff_ffff, 1]);
    let y = u32s(&[1, 0xffff_ffff]);
    assert_eq!(
        eval(
            "setp.lt.s32 {d}, {0}, {1}",
            "pred",
            &["s32"; 2],
            &[x.clone(), y.clone()]
        ),
        vec![1, 0]
    );
    assert_eq!(
        eval("setp.lt.u32 {d}, {0}, {1}", "pred", &["u32"; 2], &[x, y]),
        vec![0, 1]
    );
    // .ftz: a subnormal equals zero
    let sub = u32s(&[1, 0x8000_0001]);
    let zero = f32s(&[0.0, 0.0]);
    assert_eq!(
        eval(
            "setp.eq.ftz.f32 {d}, {0}, {1}",
            "pred",
            &["f32"; 2],
            &[sub.clone(), zero.clone()]
        ),
        vec![1, 1]
    );
    assert_eq!(
        eval(
            "setp.eq.f32 {d}, {0}, {1}",
            "pred",
            &["f32"; 2],
            &[sub, zero]
        ),
        vec![0, 0]
    );
}

#[test]
fn integer_shifts_division_and_wide_multiplies() {
    let a = u32s(&[1, 1, 0x8000_0000, 0x8000_0000, 7, 0xffff_fff0]);
    let sh = u32s(&[31, 32, 40, 31, 100, 2]);
    assert_eq!(
        as_u32(&eval(
            "shl.b32 {d}, {0}, {1}",
            "b32",
            &["b32", "u32"],
            &[a.clone(), sh.clone()]
        )),
        vec![0x8000_0000, 0, 0, 0, 0, 0xffff_ffc0],
        "shl clamps shifts of 32 or more to 0"
    );
    assert_eq!(
        as_u32(&eval(
            "shr.s32 {d}, {0}, {1}",
            "s32",
            &["s32", "u32"],
            &[a.clone(), sh.clone()]
        )),
        vec![0, 0, 0xffff_ffff, 0xffff_ffff, 0, 0xffff_fffc],
        "shr.s fills with the sign"
    );
    assert_eq!(
        as_u32(&eval("shr.u32 {d}, {0}, {1}", "u32", &["u32"; 2], &[a, sh])),
        vec![0, 0, 0, 1, 0, 0x3fff_fffc]
    );
    let x = vec![1u64 << 40, 5];
    let s64 = u32s(&[64, 3]);
    assert_eq!(
        eval("shl.b64 {d}, {0}, {1}", "b64", &["b64", "u32"], &[x, s64]),
        vec![0, 40]
    );
    // division: truncation toward zero, and the value gpu-sim gives for x / 0
    let n = u32s(&[7, (-7i32) as u32, 7, 5, 0x8000_0000]);
    let d = u32s(&[2, 2, 0, 0, 0xffff_ffff]);
    assert_eq!(
        as_u32(&eval(
            "div.s32 {d}, {0}, {1}",
            "s32",
            &["s32"; 2],
            &[n.clone(), d.clone()]
        )),
        vec![3, (-3i32) as u32, 0xffff_ffff, 0xffff_ffff, 0x8000_0000]
    );
    assert_eq!(
        as_u32(&eval("div.u32 {d}, {0}, {1}", "u32", &["u32"; 2], &[n, d])),
        vec![3, 0x7fff_fffc, 0xffff_ffff, 0xffff_ffff, 0]
    );
    // mul.hi: the upper half of the full product
    let big = vec![u64::MAX, 1 << 63];
    assert_eq!(
        eval(
            "mul.hi.u64 {d}, {0}, {1}",
            "u64",
            &["u64"; 2],
            &[big.clone(), vec![u64::MAX, 4]]
        ),
        vec![u64::MAX - 1, 2]
    );
    assert_eq!(
        eval(
            "mul.hi.s64 {d}, {0}, {1}",
            "s64",
            &["s64"; 2],
            &[big, vec![2, 4]]
        ),
        vec![u64::MAX, u64::MAX - 1]
    );
    assert_eq!(
        as_u32(&eval(
            "mul.hi.s32 {d}, {0}, {1}",
            "s32",
            &["s32"; 2],
            &[
                u32s(&[(-3i32) as u32, 0x8000_0000]),
                u32s(&[0x4000_0000, 0x8000_0000])
            ]
        )),
        vec![0xffff_ffff, 0x4000_0000]
    );
    // mul.wide.s32 sign-extends, .u32 does not
    let a = u32s(&[(-2i32) as u32, 0xffff_ffff]);
    let b = u32s(&[3, 2]);
    assert_eq!(
        eval(
            "mul.wide.s32 {d}, {0}, {1}",
            "s64",
            &["s32"; 2],
            &[a.clone(), b.clone()]
        ),
        vec![(-6i64) as u64, (-2i64) as u64]
    );
    assert_eq!(
        eval(
            "mul.wide.u32 {d}, {0}, {1}",
            "u64",
            &["u32"; 2],
            &[a.clone(), b.clone()]
        ),
        vec![0x2_ffff_fffa, 0x1_ffff_fffe]
    );
    assert_eq!(
        as_u32(&eval(
            "mad.lo.s32 {d}, {0}, {1}, {2}",
            "s32",
            &["s32"; 3],
            &[a.clone(), b.clone(), u32s(&[10, 10])]
        )),
        vec![4, 8]
    );
    assert_eq!(
        eval(
            "mad.wide.u32 {d}, {0}, {1}, {2}",
            "u64",
            &["u32", "u32", "u64"],
            &[a, b, vec![1 << 40, 1]]
        ),
        vec![(1u64 << 40) + 0x2_ffff_fffa, 0x1_ffff_ffff]
    );
}

#[test]
fn bfi_selp_and_cvt_modes() {
    // bfi.b64 d, a, b, 32, 32: the low word of a into the high word of b
    let out = eval(
        "bfi.b64 {d}, {0}, {1}, 32, 32",
        "b64",
        &["b64"; 2],
        &[vec![0x1111_2222_3333_4444], vec![0x5555_6666_7777_8888]],
    );
    assert_eq!(out, vec![0x3333_4444_7777_8888]);
    let out = eval(
        "bfi.b32 {d}, {0}, {1}, 4, 8",
        "b32",
        &["b32"; 2],
        &[u32s(&[0xab]), u32s(&[0xffff_ffff])],
    );
    assert_eq!(as_u32(&out), vec![0xffff_fabf]);
    let out = eval(
        "selp.b32 {d}, {0}, {1}, {2}",
        "b32",
        &["b32", "b32", "pred"],
        &[u32s(&[1, 1]), u32s(&[2, 2]), u32s(&[1, 0])],
    );
    assert_eq!(as_u32(&out), vec![1, 2]);
    // cvt.sat.f32.f32: clamp to [0, 1], NaN to 0
    let out = as_f32(&eval(
        "cvt.sat.f32.f32 {d}, {0}",
        "f32",
        &["f32"],
        &[f32s(&[1.5, -0.5, f32::NAN, 0.25, -0.0])],
    ));
    assert_eq!(
        out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        vec![0x3f80_0000, 0, 0, 0x3e80_0000, 0]
    );
    // cvt.rni.s32.f32: nearest even, saturating, NaN to 0
    let out = as_u32(&eval(
        "cvt.rni.s32.f32 {d}, {0}",
        "s32",
        &["f32"],
        &[f32s(&[2.5, 3.5, -2.5, f32::NAN, 1e10, -1e10])],
    ));
    assert_eq!(
        out,
        vec![2, 4, (-2i32) as u32, 0, i32::MAX as u32, i32::MIN as u32]
    );
    let out = eval(
        "cvt.rzi.f64.f64 {d}, {0}",
        "f64",
        &["f64"],
        &[vec![(-2.7f64).to_bits(), 2.7f64.to_bits()]],
    );
    assert_eq!(out, vec![(-2.0f64).to_bits(), 2.0f64.to_bits()]);
    // integer widening and narrowing
    assert_eq!(
        eval(
            "cvt.s64.s32 {d}, {0}",
            "s64",
            &["s32"],
            &[u32s(&[0xffff_fffe])]
        ),
        vec![(-2i64) as u64]
    );
    assert_eq!(
        eval(
            "cvt.u64.u32 {d}, {0}",
            "u64",
            &["u32"],
            &[u32s(&[0xffff_fffe])]
        ),
        vec![0xffff_fffe]
    );
    assert_eq!(
        eval(
            "cvt.u32.u64 {d}, {0}",
            "u32",
            &["u64"],
            &[vec![0x1_2345_6789]]
        ),
        vec![0x2345_6789]
    );
    assert_eq!(
        eval("cvt.u16.u32 {d}, {0}", "u16", &["u32"], &[vec![0x1_2345]]),
        vec![0x2345]
    );
    // f64 <-> f32, int -> float round to nearest
    let out = eval(
        "cvt.rn.f32.f64 {d}, {0}",
        "f32",
        &["f64"],
        &[vec![
            (1.0f64 + 2f64.powi(-24)).to_bits(),
            (1.0f64 + 3.0 * 2f64.powi(-24)).to_bits(),
        ]],
    );
    assert_eq!(as_u32(&out), vec![0x3f80_0000, 0x3f80_0002]);
    let out = eval(
        "cvt.rn.f32.s32 {d}, {0}",
        "f32",
        &["s32"],
        &[u32s(&[16_777_217, (-3i32) as u32])],
    );
    assert_eq!(as_f32(&out), vec![16_777_216.0, -3.0]);
}

#[test]
fn f64_arithmetic_and_rcp_sqrt_div() {
    let out = eval(
        "fma.rn.f64 {d}, {0}, {1}, {2}",
        "f64",
        &["f64"; 3],
        &[
            vec![(1.0f64 + f64::EPSILON).to_bits()],
            vec![(1.0f64 - f64::EPSILON).to_bits()],
            vec![(-1.0f64).to_bits()],
        ],
    );
    // (1+e)(1-e) - 1 = -e^2 exactly (a separate mul and add would give 0)
    assert_eq!(f64::from_bits(out[0]), -f64::EPSILON * f64::EPSILON);
    let out = as_f32(&eval(
        "div.rn.f32 {d}, {0}, {1}",
        "f32",
        &["f32"; 2],
        &[f32s(&[1.0, 1.0, 0.0]), f32s(&[3.0, 0.0, 0.0])],
    ));
    assert_eq!(out[0], 1.0f32 / 3.0);
    assert_eq!(out[1], f32::INFINITY);
    assert!(out[2].is_nan());
    let out = as_f32(&eval(
        "sqrt.rn.f32 {d}, {0}",
        "f32",
        &["f32"],
        &[f32s(&[2.0, -1.0])],
    ));
    assert_eq!(out[0], 2f32.sqrt());
    assert!(out[1].is_nan());
    let out = as_f32(&eval(
        "rcp.rn.f32 {d}, {0}",
        "f32",
        &["f32"],
        &[f32s(&[3.0])],
    ));
    assert_eq!(out[0], 1.0f32 / 3.0);
    let out = eval(
        "rcp.approx.ftz.f64 {d}, {0}",
        "f64",
        &["f64"],
        &[vec![4.0f64.to_bits(), 1e-310f64.to_bits()]],
    );
    assert_eq!(f64::from_bits(out[0]), 0.25);
    assert_eq!(
        f64::from_bits(out[1]),
        f64::INFINITY,
        "a subnormal input is flushed to +0"
    );
}
