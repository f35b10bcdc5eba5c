//! The host side of every kernel launch, checked without a GPU: every CUDA op runs on a
//! [`Cuda::dry_run`] backend at toy and Llama 2 7B/70B shapes, where [`Cuda::launch`] checks each
//! launch against the kernel's PTX (argument count and sizes, block, grid, shared memory and its
//! opt-in) and records it. The records are then checked against the kernels' C declarations in
//! `kernels-cu/*.cu`, which tell a pointer from a 64-bit integer where PTX does not, and every
//! `.entry` of every module must have been launched. Skips (with a message) in builds without
//! compiled kernels; CI compiles them.

use super::{check_launch, kernel_info, launch, module_ptx, registry, Cuda, Dim3, DRY_RUN_BASE};
use crate::backend::{AdamWStep, AttnDims, Backend, CacheDims};
use crate::error::Error;
use half::bf16;
use std::collections::BTreeSet;
use std::path::Path;

/// A dry-run backend modelling an H100 (132 SMs), or None with the reason printed.
fn dry() -> Option<Cuda> {
    if !super::KERNELS_COMPILED {
        println!("skipped: this build has no compiled kernels (nvcc was not found at build time)");
        return None;
    }
    Some(Cuda::dry_run(132, false).expect("a dry-run backend"))
}

/// One C declaration of an `extern "C" __global__` kernel: its name (a `prefix##PARAM` name from
/// a macro matches every entry `prefix<alphanumerics>`) and parameter kinds (`p` pointer, `q`
/// 64-bit integer, `i` 32-bit integer, `f` float, `?` anything else).
#[derive(Debug)]
struct CDecl {
    name: String,
    kinds: Vec<u8>,
}

impl CDecl {
    fn matches(&self, entry: &str) -> bool {
        match self.name.split_once("##") {
            Some((prefix, _)) => entry.strip_prefix(prefix).is_some_and(|rest| {
                !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric())
            }),
            None => self.name == entry,
        }
    }
}

/// The kind of one C parameter declaration such as `const bf16* q` or `int64_t n`.
fn c_kind(param: &str) -> u8 {
    if param.contains('*') {
        return b'p';
    }
    let words: Vec<&str> = param
        .split_whitespace()
        .filter(|w| !matches!(*w, "const" | "__restrict__" | "volatile"))
        .collect();
    let ty = words[..words.len().saturating_sub(1)].join(" ");
    match ty.as_str() {
        "int64_t" | "i64" | "long long" | "long" | "size_t" | "uint64_t" | "unsigned long long" => {
            b'q'
        }
        "int" | "int32_t" | "uint32_t" | "unsigned" | "unsigned int" => b'i',
        "float" => b'f',
        _ => b'?',
    }
}

/// The text inside the parentheses that open at `s[0]`, and what follows them.
fn parens(s: &str) -> Option<(&str, &str)> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&s[1..i], &s[i + 1..]));
                }
            }
            _ => {}
        }
    }
    None
}

/// Every `extern "C" __global__` kernel declared in a `.cu` file's text.
fn c_declarations(src: &str) -> Vec<CDecl> {
    // Join macro continuation lines and drop comments.
    let joined = src.replace("\\\n", " ");
    let mut text = String::new();
    let mut rest = joined.as_str();
    while let Some(i) = rest.find("/*") {
        text.push_str(&rest[..i]);
        rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
    }
    text.push_str(rest);
    let text: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");

    let mut out = Vec::new();
    for (at, _) in text.match_indices("extern \"C\" __global__") {
        let mut s = text[at + "extern \"C\" __global__".len()..].trim_start();
        s = s.strip_prefix("void").unwrap_or(s).trim_start();
        if let Some(lb) = s.strip_prefix("__launch_bounds__") {
            s = parens(lb.trim_start())
                .map_or("", |(_, after)| after)
                .trim_start();
        }
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '#'))
            .unwrap_or(s.len());
        let name = s[..end].to_string();
        let Some((params, _)) = parens(s[end..].trim_start()) else {
            continue;
        };
        let kinds = params
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "void")
            .map(c_kind)
            .collect();
        out.push(CDecl { name, kinds });
    }
    out
}

/// The C declarations of module `module` (`kernels-cu/<module>.cu`).
fn module_declarations(module: &str) -> Vec<CDecl> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kernels-cu")
        .join(format!("{module}.cu"));
    let src = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    c_declarations(&src)
}

/// The `.entry` names of a PTX module.
fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| l.split(".entry ").nth(1))
        .map(|r| r.split('(').next().unwrap_or("").trim().to_string())
        .collect()
}

/// How a launch's argument kinds disagree with the kernel's C declaration, if they do.
fn c_mismatch(decl: &CDecl, kinds: &[u8]) -> Option<String> {
    (decl.kinds != kinds).then(|| {
        format!(
            "`{}` is declared `{}` in C but launched with `{}` (p: pointer, q: 64-bit integer, \
             i: 32-bit integer, f: float)",
            decl.name,
            String::from_utf8_lossy(&decl.kinds),
            String::from_utf8_lossy(kinds)
        )
    })
}

/// Model shapes to run every op at.
#[derive(Clone, Copy, Debug)]
struct Shape {
    b: usize,
    t: usize,
    h: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    ffn: usize,
    v: usize,
    /// Hand attention views that are not 16-byte aligned (the naive path for hd 64/128).
    misalign: bool,
}

const SHAPES: &[Shape] = &[
    // Odd toy dims: naive attention (hd 8), scalar paths.
    Shape {
        b: 2,
        t: 7,
        h: 24,
        nh: 3,
        nkv: 1,
        hd: 8,
        ffn: 40,
        v: 37,
        misalign: false,
    },
    // Fast attention with hd 64 (under 48 KiB forward), GQA.
    Shape {
        b: 2,
        t: 130,
        h: 256,
        nh: 4,
        nkv: 2,
        hd: 64,
        ffn: 688,
        v: 1000,
        misalign: false,
    },
    // The same through the naive kernels (unaligned views).
    Shape {
        b: 2,
        t: 130,
        h: 256,
        nh: 4,
        nkv: 2,
        hd: 64,
        ffn: 688,
        v: 1000,
        misalign: true,
    },
    // Llama 2 7B, 4 × 4096 tokens.
    Shape {
        b: 4,
        t: 4096,
        h: 4096,
        nh: 32,
        nkv: 32,
        hd: 128,
        ffn: 11008,
        v: 32000,
        misalign: false,
    },
    // Llama 2 70B, one 4096-token sequence; hd 128 unaligned too.
    Shape {
        b: 1,
        t: 4096,
        h: 8192,
        nh: 64,
        nkv: 8,
        hd: 128,
        ffn: 28672,
        v: 32000,
        misalign: false,
    },
    Shape {
        b: 1,
        t: 300,
        h: 8192,
        nh: 64,
        nkv: 8,
        hd: 128,
        ffn: 28672,
        v: 32000,
        misalign: true,
    },
];

/// A view of `len` elements of a fresh buffer, 2 bytes off 16-byte alignment when `mis`.
macro_rules! view {
    ($cx:expr, $buf:ident: $t:ty, $len:expr, $mis:expr) => {
        let $buf = $cx.alloc::<$t>($len + 1).unwrap();
        let $buf = Cuda::slice(&$buf, $mis as usize, $len);
    };
}

/// Runs every kernel-backed op of the CUDA backend once at shape `s`.
fn run_ops(cx: &Cuda, s: Shape) -> crate::error::Result<()> {
    let Shape {
        b,
        t,
        h,
        nh,
        nkv,
        hd,
        ffn,
        v,
        misalign,
    } = s;
    let n = b * t;
    let buf16 = |len: usize| cx.alloc::<bf16>(len).unwrap();
    let buf32 = |len: usize| cx.alloc::<f32>(len).unwrap();
    let bufi = |len: usize| cx.alloc::<i32>(len).unwrap();

    let master = buf32(h * 3);
    let mut shadow = buf16(h * 3);
    cx.sync_shadow(&mut shadow, &master)?;

    let (x, y, mut out, w) = (buf16(n * h), buf16(n * h), buf16(n * h), buf16(h));
    cx.add(Cuda::all_mut(&mut out), Cuda::all(&x), Cuda::all(&y))?;

    let ids = bufi(n);
    let ids_host: Vec<i32> = (0..n).map(|i| ((i * 7919) % v) as i32).collect();
    let wte = buf16(v * h);
    cx.embedding_fwd(Cuda::all_mut(&mut out), Cuda::all(&ids), Cuda::all(&wte), h)?;
    let mut dwte = buf32(v * h);
    cx.embedding_bwd(
        Cuda::all_mut(&mut dwte),
        Cuda::all(&x),
        Cuda::all(&ids),
        &ids_host,
        h,
    )?;

    let mut rstd = buf32(n);
    cx.rmsnorm_fwd(
        Cuda::all_mut(&mut out),
        Cuda::all_mut(&mut rstd),
        Cuda::all(&x),
        Cuda::all(&w),
        h,
        1e-5,
    )?;
    let mut dw = buf32(h);
    cx.rmsnorm_bwd(
        Cuda::all_mut(&mut out),
        Cuda::all_mut(&mut dw),
        Cuda::all(&y),
        Cuda::all(&x),
        Cuda::all(&w),
        Cuda::all(&rstd),
        h,
    )?;

    let pos = bufi(n);
    let mut q = buf16(n * nh * hd);
    cx.rope_fwd(Cuda::all_mut(&mut q), Cuda::all(&pos), nh, hd, 10000.0)?;
    cx.rope_bwd(Cuda::all_mut(&mut q), Cuda::all(&pos), nh, hd, 10000.0)?;

    // Attention, with and without document ids; views misaligned on request.
    let d = AttnDims { b, t, nh, nkv, hd };
    let (nq, nk) = (n * nh * hd, n * nkv * hd);
    view!(cx, q: bf16, nq, misalign);
    view!(cx, k: bf16, nk, misalign);
    view!(cx, vv: bf16, nk, misalign);
    view!(cx, o: bf16, nq, misalign);
    view!(cx, dout: bf16, nq, misalign);
    let doc = bufi(n);
    let (mut ao, mut lse) = (cx.alloc::<bf16>(nq + 1).unwrap(), buf32(n * nh));
    let (mut dq, mut dk, mut dv) = (
        cx.alloc::<bf16>(nq + 1).unwrap(),
        cx.alloc::<bf16>(nk + 1).unwrap(),
        cx.alloc::<bf16>(nk + 1).unwrap(),
    );
    let m = misalign as usize;
    for doc in [None, Some(Cuda::all(&doc))] {
        cx.attention_fwd(
            ao.slice_mut(m, nq),
            Cuda::all_mut(&mut lse),
            q,
            k,
            vv,
            doc,
            d,
        )?;
        cx.attention_bwd(
            dq.slice_mut(m, nq),
            dk.slice_mut(m, nk),
            dv.slice_mut(m, nk),
            dout,
            q,
            k,
            vv,
            o,
            Cuda::all(&lse),
            doc,
            d,
        )?;
    }
    let tmax = t + 5;
    let cd = CacheDims {
        b,
        tq: 1,
        tmax,
        nh,
        nkv,
        hd,
    };
    let (kc, vc, qpos) = (
        buf16(b * tmax * nkv * hd),
        buf16(b * tmax * nkv * hd),
        bufi(b),
    );
    let qs = Cuda::slice(&ao, 0, b * nh * hd);
    let mut co = buf16(b * nh * hd);
    cx.attention_cached(
        Cuda::all_mut(&mut co),
        qs,
        Cuda::all(&kc),
        Cuda::all(&vc),
        Cuda::all(&qpos),
        cd,
    )?;

    let rows = bufi(n / 2 + 1);
    let part = buf16((n / 2 + 1) * h);
    cx.scatter_rows(
        Cuda::all_mut(&mut out),
        Cuda::all(&part),
        Cuda::all(&rows),
        h,
    )?;
    let mut part = part;
    cx.gather_rows(Cuda::all_mut(&mut part), Cuda::all(&x), Cuda::all(&rows), h)?;

    let (gate, up, mut act, dact) = (
        buf16(n * ffn),
        buf16(n * ffn),
        buf16(n * ffn),
        buf16(n * ffn),
    );
    cx.swiglu_fwd(Cuda::all_mut(&mut act), Cuda::all(&gate), Cuda::all(&up))?;
    let (mut dgate, mut dup) = (buf16(n * ffn), buf16(n * ffn));
    cx.swiglu_bwd(
        Cuda::all_mut(&mut dgate),
        Cuda::all_mut(&mut dup),
        Cuda::all(&dact),
        Cuda::all(&gate),
        Cuda::all(&up),
    )?;

    let mut logits = buf16(n * v);
    let mut losses = buf32(n);
    cx.cross_entropy_fwd(
        Cuda::all_mut(&mut losses),
        Cuda::all(&logits),
        Cuda::all(&ids),
        v,
    )?;
    cx.cross_entropy_bwd(
        Cuda::all_mut(&mut logits),
        Cuda::all(&ids),
        v,
        1.0 / n as f32,
    )?;
    let mut ent = buf32(n);
    cx.logprob_fwd(
        Cuda::all_mut(&mut losses),
        Cuda::all_mut(&mut ent),
        Cuda::all(&logits),
        Cuda::all(&ids),
        v,
    )?;
    cx.logprob_bwd(
        Cuda::all_mut(&mut logits),
        Cuda::all(&ids),
        Cuda::all(&ent),
        v,
    )?;

    let mut vals = buf32(n / 2 + 1);
    cx.scalar_head_fwd(
        Cuda::all_mut(&mut vals),
        Cuda::all(&x),
        Cuda::all(&w),
        Cuda::all(&rows),
        h,
    )?;
    let mut dh = buf16(n * h);
    cx.scalar_head_bwd(
        Cuda::all_mut(&mut dh),
        Cuda::all_mut(&mut dw),
        Cuda::all(&vals),
        Cuda::all(&x),
        Cuda::all(&w),
        Cuda::all(&rows),
        h,
    )?;

    let step = AdamWStep {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.5,
    };
    let (mut pm, mut mm, mut vm, g) = (buf32(n * h), buf32(n * h), buf32(n * h), buf32(n * h));
    let mut sh = buf16(n * h);
    cx.adamw(
        Cuda::all_mut(&mut pm),
        None,
        Cuda::all_mut(&mut mm),
        Cuda::all_mut(&mut vm),
        Cuda::all(&g),
        step,
    )?;
    cx.adamw(
        Cuda::all_mut(&mut pm),
        Some(Cuda::all_mut(&mut sh)),
        Cuda::all_mut(&mut mm),
        Cuda::all_mut(&mut vm),
        Cuda::all(&g),
        step,
    )?;
    cx.sum_squares(Cuda::all(&g))?;
    cx.sum(Cuda::slice(&g, 0, 1000.min(n * h)))?;
    Ok(())
}

/// Every launch every op makes, at every shape: legal against the PTX (checked by
/// `Cuda::launch` itself, so an op returning Err here is a failure), argument kinds exactly the
/// C declaration's (pointer vs 64-bit integer included), pointer arguments device addresses (or 0
/// for an optional one) and integer arguments not, and every kernel of every module launched.
#[test]
fn every_op_launches_its_kernels_as_declared() {
    let Some(cx) = dry() else { return };
    for s in SHAPES {
        run_ops(&cx, *s).unwrap_or_else(|e| panic!("at {s:?}: {e}"));
    }
    let launches = cx.dry_launches();
    let mut problems = BTreeSet::new();
    let mut launched = BTreeSet::new();
    for l in &launches {
        launched.insert((l.module.clone(), l.name.clone()));
        let decls = module_declarations(&l.module);
        let Some(decl) = decls.iter().find(|d| d.matches(&l.name)) else {
            problems.insert(format!("{}: no C declaration of `{}`", l.module, l.name));
            continue;
        };
        if let Some(why) = c_mismatch(decl, &l.kinds) {
            problems.insert(format!("{}::{}: {why}", l.module, l.name));
        }
        for (i, (&bits, &kind)) in l.args.iter().zip(&l.kinds).enumerate() {
            let is_addr = bits >= DRY_RUN_BASE;
            match kind {
                b'p' if bits != 0 && !is_addr => problems.insert(format!(
                    "{}::{} argument {i} is a pointer but gets {bits:#x}, not a device address",
                    l.module, l.name
                )),
                b'q' if is_addr => problems.insert(format!(
                    "{}::{} argument {i} is an integer but gets a device address",
                    l.module, l.name
                )),
                _ => false,
            };
        }
    }
    for (module, ptx) in registry::PTX {
        for entry in ptx_entries(ptx) {
            // LLAMA2_ATTN=naive in the environment keeps the fast attention kernels unused.
            let fast_attn = entry.contains("_bf16_hd") || entry == "attention_bwd_dq_convert_bf16";
            if super::attention::naive_forced() && fast_attn {
                continue;
            }
            if !launched.contains(&(module.to_string(), entry.clone())) {
                problems.insert(format!("{module}::{entry} is never launched by any op"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} launches checked; problems:\n{}",
        launches.len(),
        problems.into_iter().collect::<Vec<_>>().join("\n")
    );
    println!("{} launches checked", launches.len());
}

/// The C declarations parse to what the PTX says (pointers and 64-bit integers both `.u64`),
/// for every kernel of every module; so the pointer/integer distinction above rests on a parse
/// that agrees with the compiler.
#[test]
fn c_declarations_agree_with_the_ptx() {
    if dry().is_none() {
        return;
    }
    for (module, ptx) in registry::PTX {
        let decls = module_declarations(module);
        for entry in ptx_entries(ptx) {
            let matching: Vec<&CDecl> = decls.iter().filter(|d| d.matches(&entry)).collect();
            assert_eq!(
                matching.len(),
                1,
                "{module}::{entry}: C declarations {matching:?}"
            );
            let want: Vec<u8> = matching[0]
                .kinds
                .iter()
                .map(|&k| if k == b'p' { b'q' } else { k })
                .collect();
            let info = kernel_info(ptx, &entry).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&info.params),
                String::from_utf8_lossy(&want),
                "{module}::{entry}: PTX parameters vs C declaration"
            );
        }
    }
}

/// The PTX facts the checks rest on, against values read off the kernels' source.
#[test]
fn kernel_info_reads_launch_bounds_and_static_shared_memory() {
    if dry().is_none() {
        return;
    }
    let info = |m: &str, k: &str| kernel_info(module_ptx(m).unwrap(), k).unwrap();
    // __shared__ float sh[32]; __launch_bounds__(256)
    let r = info("rmsnorm", "rmsnorm_bwd_bf16");
    assert_eq!((r.static_smem, r.max_threads), (128, Some(256)));
    // __shared__ double sh[32]
    assert_eq!(info("reduce", "reduce_sum_f32").static_smem, 256);
    assert_eq!(info("reduce", "reduce_finish_f64").max_threads, Some(1024));
    // rope_impl's module-scope sin/cos tables: 2 × 512 floats
    assert_eq!(info("rope", "rope_fwd_bf16").static_smem, 4096);
    // s_m[8], s_l[8], s_o[8][256] floats
    assert_eq!(
        info("attention", "attention_cached_bf16").static_smem,
        32 + 32 + 8192
    );
    let f = info("attention", "attention_fwd_bf16_hd128");
    assert_eq!((f.static_smem, f.max_threads), (4, Some(128)));
}

/// The checks fail on planted mismatches: a swapped 32/64-bit argument, a missing one, a pointer
/// where a size goes, an illegal block, grid or shared-memory size, an unknown kernel.
#[test]
fn launch_checks_catch_planted_mismatches() {
    let Some(cx) = dry() else { return };
    // reduce_sum_f32(double* partials, const float* x, int64_t n, int32_t square)
    let info = kernel_info(module_ptx("reduce").unwrap(), "reduce_sum_f32").unwrap();
    let ok = |grid: Dim3, block: Dim3, smem: u32, kinds: &[u8]| {
        check_launch(
            &info,
            0,
            "reduce",
            "reduce_sum_f32",
            grid,
            block,
            smem,
            kinds,
        )
    };
    let one = Dim3(1, 1, 1);
    let b256 = Dim3(256, 1, 1);
    assert_eq!(ok(one, b256, 0, b"ppqi"), Ok(()));
    for bad in [&b"ppqq"[..], b"ppiq", b"ppq", b"ppqii", b"ppfi"] {
        let e = ok(one, b256, 0, bad).unwrap_err();
        assert!(e.contains("takes parameters `qqqi`"), "{e}");
    }
    assert!(ok(one, Dim3(512, 1, 1), 0, b"ppqi")
        .unwrap_err()
        .contains("__launch_bounds__"));
    assert!(ok(one, Dim3(2048, 1, 1), 0, b"ppqi")
        .unwrap_err()
        .contains("legal CUDA block"));
    assert!(ok(Dim3(1, 70000, 1), b256, 0, b"ppqi")
        .unwrap_err()
        .contains("legal CUDA grid"));
    // 48 KiB less the 256 static bytes, and no more without an opt-in.
    assert_eq!(ok(one, b256, 48 * 1024 - 256, b"ppqi"), Ok(()));
    assert!(ok(one, b256, 48 * 1024 - 255, b"ppqi")
        .unwrap_err()
        .contains("opt_in_smem"));
    assert_eq!(
        check_launch(
            &info,
            64 * 1024,
            "reduce",
            "reduce_sum_f32",
            one,
            b256,
            60 * 1024,
            b"ppqi"
        ),
        Ok(())
    );

    // Through launch! on the dry backend: a bool widened to i64 instead of i32 never launches.
    let x = cx.alloc::<f32>(10).unwrap();
    let partials = cx.reduce_ptr();
    let n = 10usize;
    let r = launch!(cx, "reduce", "reduce_sum_f32", 1, 256, 0; partials, Cuda::all(&x), n, 1i64);
    assert!(
        matches!(r, Err(Error::Device(ref e)) if e.contains("`ppqq`")),
        "{r:?}"
    );
    let r = launch!(cx, "reduce", "reduce_sum_f32", 1, 256, 0; partials, Cuda::all(&x), n, 1i32);
    assert!(r.is_ok(), "{r:?}");
    let r = launch!(cx, "reduce", "reduce_sum_oops", 1, 256, 0; partials, n);
    assert!(
        matches!(r, Err(Error::Device(ref e)) if e.contains("not an entry")),
        "{r:?}"
    );
    let r = launch!(cx, "nosuch", "reduce_sum_f32", 1, 256, 0; partials, n);
    assert!(
        matches!(r, Err(Error::Device(ref e)) if e.contains("not in this build")),
        "{r:?}"
    );

    // A size and a pointer swapped keep the PTX kinds but not the C declaration's.
    let decls = module_declarations("reduce");
    let decl = decls.iter().find(|d| d.matches("reduce_sum_f32")).unwrap();
    assert_eq!(decl.kinds, b"ppqi");
    assert!(c_mismatch(decl, b"pqpi").is_some());
    assert!(c_mismatch(decl, b"ppqi").is_none());
}

/// rmsnorm_bwd refuses a hidden size whose dynamic shared memory would not fit beside the
/// kernel's static 128 bytes, and launches the largest one it accepts.
#[test]
fn rmsnorm_bwd_shared_memory_limit_is_the_kernels() {
    let Some(cx) = dry() else { return };
    let run = |h: usize| {
        let n = 3;
        let (mut dx, mut dw) = (
            cx.alloc::<bf16>(n * h).unwrap(),
            cx.alloc::<f32>(h).unwrap(),
        );
        let (dout, x, w) = (
            cx.alloc::<bf16>(n * h).unwrap(),
            cx.alloc::<bf16>(n * h).unwrap(),
            cx.alloc::<bf16>(h).unwrap(),
        );
        let rstd = cx.alloc::<f32>(n).unwrap();
        cx.rmsnorm_bwd(
            Cuda::all_mut(&mut dx),
            Cuda::all_mut(&mut dw),
            Cuda::all(&dout),
            Cuda::all(&x),
            Cuda::all(&w),
            Cuda::all(&rstd),
            h,
        )
    };
    let max = (48 * 1024 - 128) / 4;
    run(max).unwrap();
    let e = run(max + 1).unwrap_err();
    assert!(matches!(e, Error::Shape(_)), "{e}");
}

/// The dry backend's allocations are 256-aligned fake addresses, never 0, never reused.
#[test]
fn dry_run_addresses() {
    let Some(cx) = dry() else { return };
    let a = cx.alloc::<bf16>(3).unwrap();
    let b = cx.alloc::<bf16>(1).unwrap();
    assert!(a.ptr() >= DRY_RUN_BASE && a.ptr() % 256 == 0);
    assert!(b.ptr() >= a.ptr() + 256);
    assert_eq!(cx.alloc::<bf16>(0).unwrap().ptr(), 0);
    assert!(cx.func("reduce", "reduce_sum_f32").is_err());
}
