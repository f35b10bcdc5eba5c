//! What the PTX says about each kernel and the check every launch passes before the driver
//! sees it: argument count and kinds, block and grid limits, dynamic shared memory.

use super::buffers::{DMut, DRef};
use super::registry;

/// Dynamic plus static shared memory a block may use without opting in (every CUDA GPU).
pub(super) const DEFAULT_SMEM: u32 = 48 * 1024;
/// The most shared memory a block can opt in to on any supported GPU (sm_90: 227 KiB; A100 has
/// 163 KiB, which the driver enforces when the attribute is set).
pub(super) const MAX_SMEM_OPT_IN: u32 = 227 * 1024;

/// Something a kernel takes by value: device pointers as u64 (raw addresses) or views, sizes as
/// usize/i64, scalars as f32/i32. Stored in 8 bytes; CUDA reads the parameter's own size from the
/// start (little-endian). `CODE` is the kind of parameter it fills: `p` device pointer, `q` 64-bit
/// integer, `f` f32, `i` 32-bit integer. PTX spells pointers and 64-bit integers alike (`.u64`),
/// so the launch-time check matches `p` and `q` to the same PTX kind; the kernels' C declarations
/// tell them apart (checked by the dry-run tests).
pub trait KernelArg {
    const CODE: u8;
    fn bits(self) -> u64;
}
/// A raw device address (scratch, the reduction buffer, an optional pointer as 0). Sizes are
/// passed as usize or i64, never as u64, so that a size and a pointer cannot be swapped unseen.
impl KernelArg for u64 {
    const CODE: u8 = b'p';
    fn bits(self) -> u64 {
        self
    }
}
impl KernelArg for i64 {
    const CODE: u8 = b'q';
    fn bits(self) -> u64 {
        self as u64
    }
}
impl KernelArg for usize {
    const CODE: u8 = b'q';
    /// Sizes go to kernels as int64_t.
    fn bits(self) -> u64 {
        self as u64
    }
}
impl KernelArg for f32 {
    const CODE: u8 = b'f';
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}
impl KernelArg for i32 {
    const CODE: u8 = b'i';
    fn bits(self) -> u64 {
        self as u32 as u64
    }
}
impl<T> KernelArg for DRef<'_, T> {
    const CODE: u8 = b'p';
    fn bits(self) -> u64 {
        self.ptr
    }
}
impl<T> KernelArg for &DMut<'_, T> {
    const CODE: u8 = b'p';
    fn bits(self) -> u64 {
        self.ptr
    }
}

/// (bits, kind) of one kernel argument; used by `launch!`.
pub fn kernel_arg<A: KernelArg>(a: A) -> (u64, u8) {
    (a.bits(), A::CODE)
}

/// A launch's grid or block shape (x, y, z); a plain `u32` is (n, 1, 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim3(pub u32, pub u32, pub u32);
impl From<u32> for Dim3 {
    fn from(x: u32) -> Dim3 {
        Dim3(x, 1, 1)
    }
}
impl From<(u32, u32, u32)> for Dim3 {
    fn from((x, y, z): (u32, u32, u32)) -> Dim3 {
        Dim3(x, y, z)
    }
}

/// Launches `module::name` on the backend's stream: `launch!(cx, "rmsnorm", "rmsnorm_fwd_bf16",
/// grid, block, smem; out, rstd, x, w, n, h, eps)`. Grid and block are a `u32` or `(x, y, z)`;
/// arguments are [`KernelArg`]s. [`Cuda::launch`] checks the call against the kernel's PTX.
macro_rules! launch {
    ($cx:expr, $module:expr, $name:expr, $grid:expr, $block:expr, $smem:expr; $($arg:expr),+ $(,)?) => {{
        let args = [$($crate::backend::cuda::kernel_arg($arg)),+];
        let mut vals = args.map(|a| a.0);
        let kinds = args.map(|a| a.1);
        $cx.launch($module, $name, $grid, $block, $smem, &mut vals, &kinds)
    }};
}
pub(crate) use launch;

/// What a kernel's PTX says about launching it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// Parameter kinds as [`ptx_params`] gives them.
    pub params: Vec<u8>,
    /// `.maxntid` (from `__launch_bounds__`) as a thread count.
    pub max_threads: Option<u32>,
    /// `.reqntid`, when the kernel requires an exact block shape.
    pub req_threads: Option<Dim3>,
    /// Static shared memory in bytes: the `.shared` variables declared in the entry, plus the
    /// module-scope ones that it (or a `.func` it names) uses.
    pub static_smem: u32,
}

/// The launch facts of kernel `name` in PTX text, or None if the PTX has no such entry.
pub fn kernel_info(ptx: &str, name: &str) -> Option<KernelInfo> {
    let params = ptx_params(ptx, name)?;
    let start = ptx.find(&format!(".entry {name}("))?;
    let rest = &ptx[start..];
    let open = rest.find('{')?;
    let header = &rest[..open];
    // The body ends at the first `}` in column 0.
    let body = &rest[open..open + rest[open..].find("\n}").unwrap_or(rest.len() - open)];
    let dims = |directive: &str| -> Option<Vec<u32>> {
        let at = header.find(directive)?;
        let line = header[at + directive.len()..].lines().next()?;
        Some(
            line.split(',')
                .map(|d| d.trim().parse().unwrap_or(1))
                .collect(),
        )
    };
    let max_threads = dims(".maxntid").map(|d| d.iter().product());
    let req_threads = dims(".reqntid").map(|d| {
        Dim3(
            d.first().copied().unwrap_or(1),
            d.get(1).copied().unwrap_or(1),
            d.get(2).copied().unwrap_or(1),
        )
    });
    // Module-scope `.func` bodies the entry names, to find module-scope shared they use.
    let mut used = body.to_string();
    let mut at = 0;
    for line in ptx.split_inclusive('\n') {
        let head = line.trim_end().trim_end_matches("()").trim_end_matches('(');
        let is_func = [".func ", ".visible .func ", ".weak .func "]
            .iter()
            .any(|p| line.starts_with(p));
        if let Some(fname) = head
            .rsplit([' ', ')'])
            .next()
            .filter(|n| is_func && !n.is_empty())
        {
            let f = &ptx[at..];
            if body.contains(fname) {
                used.push_str(&f[..f.find("\n}").unwrap_or(f.len())]);
            }
        }
        at += line.len();
    }
    let mut static_smem = 0u32;
    for line in body.lines() {
        if let Some((_, bytes, align)) = shared_decl(line) {
            static_smem = static_smem.next_multiple_of(align) + bytes;
        }
    }
    for line in ptx.lines().filter(|l| l.starts_with(".shared")) {
        if let Some((var, bytes, align)) = shared_decl(line) {
            if used.contains(var) {
                static_smem = static_smem.next_multiple_of(align) + bytes;
            }
        }
    }
    Some(KernelInfo {
        params,
        max_threads,
        req_threads,
        static_smem,
    })
}

/// (name, bytes, alignment) of a PTX `.shared` variable declaration (not `.extern`, which is the
/// dynamic shared memory): `.shared .align 4 .b8 name[128];` or `.shared .align 4 .u32 name;`.
fn shared_decl(line: &str) -> Option<(&str, u32, u32)> {
    let decl = line.trim().strip_prefix(".shared ")?.trim_end_matches(';');
    let mut align = 1;
    let mut elem = 0;
    let mut var = "";
    let mut words = decl.split_whitespace();
    while let Some(w) = words.next() {
        match w {
            ".align" => align = words.next()?.parse().ok()?,
            _ if w.starts_with('.') => {
                elem = match &w[2..] {
                    "8" => 1,
                    "16" => 2,
                    "32" => 4,
                    "64" => 8,
                    "128" => 16,
                    _ => return None,
                }
            }
            _ => var = w,
        }
    }
    let (var, dims) = var.split_once('[').map_or((var, ""), |(v, d)| (v, d));
    let count: u32 = dims
        .split('[')
        .map(|d| d.trim_end_matches(']'))
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<u32>().ok())
        .product::<Option<u32>>()?;
    (elem > 0 && !var.is_empty()).then_some((var, elem * count, align.max(elem)))
}

/// Checks one launch of `module::name` against its PTX facts: the arguments' count and kinds,
/// the block (≤ 1024 threads, ≤ the kernel's `__launch_bounds__`, = its `.reqntid`), the grid
/// (x < 2³¹, y and z ≤ 65535) and the dynamic shared memory (≤ 48 KiB less the static, or the
/// amount `opt_in` the kernel was opted in to). The error says what disagrees.
#[allow(clippy::too_many_arguments)]
pub fn check_launch(
    info: &KernelInfo,
    opt_in: u32,
    module: &str,
    name: &str,
    grid: Dim3,
    block: Dim3,
    smem: u32,
    kinds: &[u8],
) -> std::result::Result<(), String> {
    let at = format!("kernel `{name}` (kernels-cu/{module}.cu)");
    // PTX declares pointers as .u64 like 64-bit integers.
    let as_ptx = |k: &u8| if *k == b'p' { b'q' } else { *k };
    if !kinds.iter().map(as_ptx).eq(info.params.iter().copied()) {
        return Err(format!(
            "{at} takes parameters `{}` but the launch passes `{}` (p: pointer, q: 64-bit \
             integer, f: f32, i: 32-bit integer; PTX writes pointers as q): the Rust call and the \
             kernel disagree",
            String::from_utf8_lossy(&info.params),
            String::from_utf8_lossy(kinds)
        ));
    }
    let Dim3(bx, by, bz) = block;
    let threads = bx as u64 * by as u64 * bz as u64;
    if threads == 0 || bx > 1024 || by > 1024 || bz > 64 || threads > 1024 {
        return Err(format!(
            "{at}: block {block:?} is not a legal CUDA block (each dimension ≥ 1, x, y ≤ 1024, \
             z ≤ 64, at most 1024 threads)"
        ));
    }
    if let Some(max) = info.max_threads.filter(|&m| threads > m as u64) {
        return Err(format!(
            "{at}: a block of {threads} threads exceeds the kernel's __launch_bounds__ ({max})"
        ));
    }
    if let Some(req) = info.req_threads.filter(|&r| r != block) {
        return Err(format!(
            "{at}: block {block:?}, the kernel requires {req:?}"
        ));
    }
    let Dim3(gx, gy, gz) = grid;
    if gx == 0 || gy == 0 || gz == 0 || gx > i32::MAX as u32 || gy > 65535 || gz > 65535 {
        return Err(format!(
            "{at}: grid {grid:?} is not a legal CUDA grid (x in 1..2³¹, y and z in 1..=65535)"
        ));
    }
    let limit = opt_in.max(DEFAULT_SMEM.saturating_sub(info.static_smem));
    if smem > limit {
        return Err(format!(
            "{at}: {smem} bytes of dynamic shared memory exceed the {limit} the kernel may use \
             ({} static; above 48 KiB in all it needs Cuda::opt_in_smem)",
            info.static_smem
        ));
    }
    Ok(())
}

/// The parameter kinds of kernel `name` in PTX text (`q` 64-bit integer or pointer, `f` f32,
/// `i` 32-bit integer, `?` anything else), or None if the PTX has no such entry.
pub fn ptx_params(ptx: &str, name: &str) -> Option<Vec<u8>> {
    let start = ptx.find(&format!(".entry {name}("))?;
    let body = &ptx[start..];
    let end = body.find(')')?;
    Some(
        body[..end]
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".param "))
            .map(|p| {
                let ty = p.split_whitespace().next().unwrap_or("");
                match ty {
                    ".u64" | ".s64" | ".b64" => b'q',
                    ".f32" => b'f',
                    ".u32" | ".s32" | ".b32" => b'i',
                    _ => b'?',
                }
            })
            .collect(),
    )
}

/// The embedded PTX of module `module` (None in builds without kernels).
pub fn module_ptx(module: &str) -> Option<&'static str> {
    registry::PTX
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, p)| *p)
}
