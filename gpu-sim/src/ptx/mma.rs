//! Warp-wide matrix instructions as native code over the whole warp.
//!
//! mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 fragment layout (PTX ISA, "Matrix
//! fragments for mma.m16n8k16"): lane = 4·g + t.
//!   A (16×16): reg 0 = A[g][2t..2t+1], 1 = A[g+8][2t..], 2 = A[g][2t+8..], 3 = A[g+8][2t+8..]
//!   B (16×8):  reg 0 = B[2t..2t+1][g], 1 = B[2t+8..2t+9][g]
//!   C, D (16×8 f32): 0 = C[g][2t], 1 = C[g][2t+1], 2 = C[g+8][2t], 3 = C[g+8][2t+1]
//! The lower-index element of a pair is in the low 16 bits.

/// D = A·B + C. The 16 products of a dot product are exact in f64 and summed there with C,
/// then rounded once to f32 (tensor cores accumulate at least as precisely as f32; the ISA
/// leaves the order unspecified).
pub fn mma_m16n8k16_bf16(a: &[[u32; 32]; 4], b: &[[u32; 32]; 2], c: &[[u32; 32]; 4]) -> [[u32; 32]; 4] {
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
    let mut d = [[0u32; 32]; 4];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for r in 0..4 {
            let row = g + if r >= 2 { 8 } else { 0 };
            let col = 2 * t + (r & 1);
            let ar = &am[row];
            let bc = &bm[col];
            let mut acc = [0f64; 4];
            for k in (0..16).step_by(4) {
                for j in 0..4 {
                    acc[j] += ar[k + j] as f64 * bc[k + j] as f64;
                }
            }
            let s = (acc[0] + acc[1]) + (acc[2] + acc[3]) + f32::from_bits(c[r][l]) as f64;
            d[r][l] = (s as f32).to_bits();
        }
    }
    d
}
