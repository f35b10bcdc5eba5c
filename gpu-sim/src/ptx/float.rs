//! Floating-point semantics of the PTX ISA: rounding modes computed exactly (exact f64
//! products plus a TwoSum error term), flush-to-zero, saturation, NaN rules, bf16/f16
//! conversion.

use super::code::Rnd;

/// `x` with subnormals flushed to a zero of the same sign.
#[inline]
pub fn ftz32(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

#[inline]
pub fn ftz64(x: f64) -> f64 {
    if x.is_subnormal() {
        f64::from_bits(x.to_bits() & (1 << 63))
    } else {
        x
    }
}

/// Clamp to [0, 1]; NaN (and -0) to +0.
#[inline]
pub fn sat32(x: f32) -> f32 {
    if x > 0.0 {
        x.min(1.0)
    } else {
        0.0
    }
}

#[inline]
pub fn sat64(x: f64) -> f64 {
    if x > 0.0 {
        x.min(1.0)
    } else {
        0.0
    }
}

/// (s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum).
#[inline]
pub fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    let e = (a - (s - bb)) + (b - bb);
    (s, e)
}

#[inline]
fn next_up32(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let b = x.to_bits();
    f32::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}

#[inline]
fn next_down32(x: f32) -> f32 {
    -next_up32(-x)
}

/// The f32 nearest `s + e` in mode `rnd`, where s + e is exact and |e| <= ulp(s) / 2 (as
/// [`two_sum`] gives).
#[inline]
pub fn round_f32(s: f64, e: f64, rnd: Rnd) -> f32 {
    if !s.is_finite() {
        return s as f32;
    }
    if rnd == Rnd::Rn {
        // Round to odd at 53 bits, then to nearest at 24: no double-rounding error.
        let mut s2 = s;
        if e != 0.0 && s.to_bits() & 1 == 0 {
            let up = (e > 0.0) == (s > 0.0);
            s2 = f64::from_bits(if up { s.to_bits() + 1 } else { s.to_bits() - 1 });
        }
        return s2 as f32;
    }
    let r = s as f32;
    // r versus the exact x = s + e: r > x  <=>  (r - s) > e, with r - s exact (r is within a
    // factor of two of s unless r overflowed or underflowed to zero, handled by sign).
    let above = if r.is_infinite() {
        r > 0.0
    } else {
        let d = r as f64 - s;
        d > e
    };
    let below = if r.is_infinite() {
        r < 0.0
    } else {
        let d = r as f64 - s;
        d < e
    };
    match rnd {
        Rnd::Rn => unreachable!(),
        Rnd::Rm => {
            if above {
                next_down32(r)
            } else {
                r
            }
        }
        Rnd::Rp => {
            if below {
                next_up32(r)
            } else {
                r
            }
        }
        Rnd::Rz => {
            let x_pos = s > 0.0 || (s == 0.0 && e > 0.0);
            if x_pos && above {
                next_down32(r)
            } else if !x_pos && below {
                next_up32(r)
            } else {
                r
            }
        }
    }
}

/// The sign of an exact zero sum in mode `rnd` (IEEE 754 6.3): -0 only when both addends are
/// -0, or in round-toward-minus when they are not both +0.
#[inline]
fn zero_sum(a: f64, b: f64, rnd: Rnd) -> f32 {
    let both_neg = a == 0.0 && b == 0.0 && a.is_sign_negative() && b.is_sign_negative();
    let both_pos = a == 0.0 && b == 0.0 && a.is_sign_positive() && b.is_sign_positive();
    if both_neg || (rnd == Rnd::Rm && !both_pos) {
        -0.0
    } else {
        0.0
    }
}

#[inline]
pub fn add32(a: f32, b: f32, rnd: Rnd) -> f32 {
    if rnd == Rnd::Rn {
        return a + b;
    }
    let (s, e) = two_sum(a as f64, b as f64);
    if s == 0.0 && e == 0.0 {
        if a.is_nan() || b.is_nan() {
            return f32::NAN;
        }
        return zero_sum(a as f64, b as f64, rnd);
    }
    round_f32(s, e, rnd)
}

#[inline]
pub fn mul32(a: f32, b: f32, rnd: Rnd) -> f32 {
    if rnd == Rnd::Rn {
        return a * b;
    }
    // exact: 24 + 24 significant bits fit in 53, and the exponent range in f64's
    round_f32(a as f64 * b as f64, 0.0, rnd)
}

/// fma.rnd.f32: a·b + c rounded once.
#[inline]
pub fn fma32(a: f32, b: f32, c: f32, rnd: Rnd) -> f32 {
    let p = a as f64 * b as f64;
    let (s, e) = two_sum(p, c as f64);
    if s == 0.0 && e == 0.0 && !p.is_nan() && !c.is_nan() {
        return zero_sum(p, c as f64, rnd);
    }
    round_f32(s, e, rnd)
}

/// min.f32 / max.f32: a NaN operand yields the other; -0 orders below +0.
#[inline]
pub fn min32(a: f32, b: f32) -> f32 {
    if a.is_nan() {
        return if b.is_nan() {
            f32::from_bits(0x7fff_ffff)
        } else {
            b
        };
    }
    if b.is_nan() {
        return a;
    }
    if a == b {
        return if a.is_sign_negative() { a } else { b };
    }
    if a < b {
        a
    } else {
        b
    }
}

#[inline]
pub fn max32(a: f32, b: f32) -> f32 {
    if a.is_nan() {
        return if b.is_nan() {
            f32::from_bits(0x7fff_ffff)
        } else {
            b
        };
    }
    if b.is_nan() {
        return a;
    }
    if a == b {
        return if a.is_sign_positive() { a } else { b };
    }
    if a > b {
        a
    } else {
        b
    }
}

#[inline]
pub fn min64(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        return if b.is_nan() { f64::NAN } else { b };
    }
    if b.is_nan() {
        return a;
    }
    if a == b {
        return if a.is_sign_negative() { a } else { b };
    }
    a.min(b)
}

#[inline]
pub fn max64(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        return if b.is_nan() { f64::NAN } else { b };
    }
    if b.is_nan() {
        return a;
    }
    if a == b {
        return if a.is_sign_positive() { a } else { b };
    }
    a.max(b)
}

/// ex2.approx.ftz.f32: 2^x with subnormal inputs and results flushed to zero. Computed in f64
/// and rounded (well within the ISA's 2^-22 relative error).
#[inline]
pub fn ex2_ftz(x: f32) -> f32 {
    let x = ftz32(x);
    if x.is_nan() {
        return f32::NAN;
    }
    ftz32(exp2_f64(x as f64) as f32)
}

/// 2^x for |x| within f32's range, in f64: an exact power of two times a polynomial on
/// [-0.5, 0.5] (relative error below 1e-15), so calling libm per lane is not needed.
#[inline]
pub fn exp2_f64(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x >= 1024.0 {
        return f64::INFINITY;
    }
    if x <= -1100.0 {
        return 0.0;
    }
    let n = x.round();
    let f = x - n; // exact, |f| <= 0.5
                   // 2^f = e^(f ln2), Taylor to degree 13: error < (0.347^14)/14! ~ 4e-18
    let t = f * std::f64::consts::LN_2;
    let mut p = 1.0 / 6227020800.0; // 1/13!
    p = p * t + 1.0 / 479001600.0;
    p = p * t + 1.0 / 39916800.0;
    p = p * t + 1.0 / 3628800.0;
    p = p * t + 1.0 / 362880.0;
    p = p * t + 1.0 / 40320.0;
    p = p * t + 1.0 / 5040.0;
    p = p * t + 1.0 / 720.0;
    p = p * t + 1.0 / 120.0;
    p = p * t + 1.0 / 24.0;
    p = p * t + 1.0 / 6.0;
    p = p * t + 0.5;
    p = p * t + 1.0;
    p = p * t + 1.0;
    // p * 2^n in two steps so neither factor over- or underflows early
    let n = n as i32;
    let h = n / 2;
    p * pow2i(h) * pow2i(n - h)
}

#[inline]
fn pow2i(k: i32) -> f64 {
    if k > 1023 {
        f64::INFINITY
    } else if k >= -1022 {
        f64::from_bits(((k + 1023) as u64) << 52)
    } else if k >= -1074 {
        f64::from_bits(1u64 << (k + 1074))
    } else {
        0.0
    }
}

/// f32 to bf16, round to nearest even; NaN gives the canonical NaN 0x7fff.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return 0x7fff;
    }
    let bias = 0x7fff + ((u >> 16) & 1);
    (u.wrapping_add(bias) >> 16) as u16
}

#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 to IEEE half, round to nearest even; NaN gives the canonical NaN 0x7fff.
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fff;
    }
    half::f16::from_f32(x).to_bits()
}

#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// Rounding of a float to an integral value.
#[inline]
pub fn round_int32(x: f32, r: super::code::IRnd) -> f32 {
    use super::code::IRnd::*;
    match r {
        Rni => x.round_ties_even(),
        Rzi => x.trunc(),
        Rmi => x.floor(),
        Rpi => x.ceil(),
    }
}

#[inline]
pub fn round_int64(x: f64, r: super::code::IRnd) -> f64 {
    use super::code::IRnd::*;
    match r {
        Rni => x.round_ties_even(),
        Rzi => x.trunc(),
        Rmi => x.floor(),
        Rpi => x.ceil(),
    }
}
