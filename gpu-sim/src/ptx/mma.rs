//! Warp-wide matrix instructions as native code over the whole warp.
//!
//! mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 fragment layout (PTX ISA, "Matrix
//! fragments for mma.m16n8k16"): lane = 4·g + t.
//!   A (16×16): reg 0 = A[g][2t..2t+1], 1 = A[g+8][2t..], 2 = A[g][2t+8..], 3 = A[g+8][2t+8..]
//!   B (16×8):  reg 0 = B[2t..2t+1][g], 1 = B[2t+8..2t+9][g]
//!   C, D (16×8 f32): 0 = C[g][2t], 1 = C[g][2t+1], 2 = C[g+8][2t], 3 = C[g+8][2t+1]
//! The lower-index element of a pair is in the low 16 bits.

/// D = A·B + C.
#[allow(clippy::needless_range_loop)]
// lane-indexed fragment arrays read clearest by lane C and the 16 products of a dot product (exact in f64) are summed in f64,
/// then rounded once to f32 (tensor cores accumulate at least as precisely as f32; the ISA
/// leaves the order unspecified).
pub fn mma_m16n8k16_bf16(
    a: [&[u32; 32]; 4],
    b: [&[u32; 32]; 2],
    c: [&[u32; 32]; 4],
) -> [[u32; 32]; 4] {
    let mut am = [[0f32; 16]; 16]; // [row][k]
    let mut bm = [[0f32; 16]; 8]; // [col][k]
    let lo = |w: u32| f32::from_bits(w << 16);
    let hi = |w: u32| f32::from_bits(w & 0xffff_0000);
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        let k0 = 2 * t;
        am[g][k0] = lo(a[0][l]);
        am[g][k0 + 1] = hi(a[0][l]);
        am[g + 8][k0] = lo(a[1][l]);
        am[g + 8][k0 + 1] = hi(a[1][l]);
        am[g][k0 + 8] = lo(a[2][l]);
        am[g][k0 + 9] = hi(a[2][l]);
        am[g + 8][k0 + 8] = lo(a[3][l]);
        am[g + 8][k0 + 9] = hi(a[3][l]);
        bm[g][k0] = lo(b[0][l]);
        bm[g][k0 + 1] = hi(b[0][l]);
        bm[g][k0 + 8] = lo(b[1][l]);
        bm[g][k0 + 9] = hi(b[1][l]);
    }
    let mut cm = [[0f32; 8]; 16];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for r in 0..4 {
            cm[g + if r >= 2 { 8 } else { 0 }][2 * t + (r & 1)] = f32::from_bits(c[r][l]);
        }
    }
    let dm = products(&am, &bm, &cm);
    let mut d = [[0u32; 32]; 4];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for r in 0..4 {
            d[r][l] = dm[g + if r >= 2 { 8 } else { 0 }][2 * t + (r & 1)].to_bits();
        }
    }
    d
}

/// C + A·B with the products (exact: 8-bit by 8-bit significands) summed in f64 in k order,
/// then rounded once; with AVX2 where the CPU has it.
fn products(am: &[[f32; 16]; 16], bm: &[[f32; 16]; 8], cm: &[[f32; 8]; 16]) -> [[f32; 8]; 16] {
    // B as [k][col], so the 8 columns of a row are contiguous
    let mut bt = [[0f64; 8]; 16];
    for (col, bc) in bm.iter().enumerate() {
        for (k, &v) in bc.iter().enumerate() {
            bt[k][col] = v as f64;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { products_avx2(am, &bt, cm) };
    }
    products_any(am, &bt, cm)
}

/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn products_avx2(
    am: &[[f32; 16]; 16],
    bt: &[[f64; 8]; 16],
    cm: &[[f32; 8]; 16],
) -> [[f32; 8]; 16] {
    products_any(am, bt, cm)
}

#[inline(always)]
fn products_any(am: &[[f32; 16]; 16], bt: &[[f64; 8]; 16], cm: &[[f32; 8]; 16]) -> [[f32; 8]; 16] {
    let mut out = [[0f32; 8]; 16];
    for i in 0..16 {
        let mut acc = [0f64; 8];
        for j in 0..8 {
            acc[j] = cm[i][j] as f64;
        }
        for k in 0..16 {
            let a = am[i][k] as f64;
            for j in 0..8 {
                acc[j] += a * bt[k][j];
            }
        }
        for j in 0..8 {
            out[i][j] = acc[j] as f32;
        }
    }
    out
}
