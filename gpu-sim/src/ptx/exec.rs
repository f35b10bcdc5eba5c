//! Execution of a decoded program: a CTA is its warps, each warp 32 lanes with registers as
//! structures of arrays and a PC per lane. The lanes at the lowest PC run together (min-PC
//! scheduling), which reconverges structured code; warp collectives wait until every member
//! lane is at the instruction; warps run in turn until they block at a barrier.

use super::code::*;
use super::decode::Program;
use super::float::*;
use super::mma::mma_m16n8k16_bf16;
use super::FaultKind;
use crate::mem::{Fault, MemView};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// Generic addresses of local memory: a window no device allocation or host pointer uses, so
/// `cvta.local` round-trips and a generic local address used as a global one fails memcheck.
pub const LOCAL_WINDOW: u64 = 0x0000_1000_0000_0000;
/// Generic addresses of shared memory.
pub const SHARED_WINDOW: u64 = 0x0000_1100_0000_0000;

const FULL: u32 = u32::MAX;

/// Everything a CTA needs from its launch.
pub struct Launch<'a> {
    pub prog: &'a Program,
    pub consts: &'a [u64],
    pub mem: &'a MemView,
    pub params: &'a [u8],
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dyn_smem: u32,
    pub racecheck: bool,
    pub stop: &'a AtomicBool,
}

/// A failure inside a CTA: which warp and lane, at which instruction.
#[derive(Debug)]
pub struct Fail {
    pub kind: FaultKind,
    pub warp: u32,
    pub lane: u32,
    pub pc: u32,
    pub addr: Option<u64>,
    pub msg: String,
    /// Another launch's CTA failed first: not an error of this one.
    pub stopped: bool,
}

fn fail(
    kind: FaultKind,
    warp: usize,
    lane: usize,
    pc: u32,
    addr: Option<u64>,
    msg: String,
) -> Fail {
    Fail {
        kind,
        warp: warp as u32,
        lane: lane as u32,
        pc,
        addr,
        msg,
        stopped: false,
    }
}

macro_rules! lanes {
    ($r:ident, $i:ident => $e:expr) => {
        for $i in 0..32 {
            $r[$i] = $e;
        }
    };
}

/// Iterates the set bits of a lane mask.
#[derive(Clone, Copy)]
struct Bits(u32);
impl Iterator for Bits {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            None
        } else {
            let i = self.0.trailing_zeros() as usize;
            self.0 &= self.0 - 1;
            Some(i)
        }
    }
}

#[inline]
fn blend<T: Copy>(dst: &mut [T; 32], v: &[T; 32], m: u32) {
    if m == FULL {
        *dst = *v;
    } else {
        for i in Bits(m) {
            dst[i] = v[i];
        }
    }
}

/// One warp's registers: typed files as structures of arrays, predicates as lane masks, and
/// a copy of the kernel's constants.
#[derive(Default)]
pub struct Regs {
    r16: Vec<[u16; 32]>,
    r32: Vec<[u32; 32]>,
    r64: Vec<[u64; 32]>,
    p: Vec<u32>,
    k: Vec<u64>,
}

impl Regs {
    #[inline(always)]
    fn g32(&self, r: Rg) -> [u32; 32] {
        match r.cls {
            Cls::R32 => self.r32[r.idx as usize],
            Cls::K => [self.k[r.idx as usize] as u32; 32],
            Cls::R64 => {
                let s = &self.r64[r.idx as usize];
                let mut d = [0u32; 32];
                lanes!(d, i => s[i] as u32);
                d
            }
            Cls::R16 => {
                let s = &self.r16[r.idx as usize];
                let mut d = [0u32; 32];
                lanes!(d, i => s[i] as u32);
                d
            }
        }
    }
    #[inline(always)]
    fn g64(&self, r: Rg) -> [u64; 32] {
        match r.cls {
            Cls::R64 => self.r64[r.idx as usize],
            Cls::K => [self.k[r.idx as usize]; 32],
            Cls::R32 => {
                let s = &self.r32[r.idx as usize];
                let mut d = [0u64; 32];
                lanes!(d, i => s[i] as u64);
                d
            }
            Cls::R16 => {
                let s = &self.r16[r.idx as usize];
                let mut d = [0u64; 32];
                lanes!(d, i => s[i] as u64);
                d
            }
        }
    }
    #[inline(always)]
    fn g16(&self, r: Rg) -> [u16; 32] {
        match r.cls {
            Cls::R16 => self.r16[r.idx as usize],
            Cls::K => [self.k[r.idx as usize] as u16; 32],
            Cls::R32 => {
                let s = &self.r32[r.idx as usize];
                let mut d = [0u16; 32];
                lanes!(d, i => s[i] as u16);
                d
            }
            Cls::R64 => {
                let s = &self.r64[r.idx as usize];
                let mut d = [0u16; 32];
                lanes!(d, i => s[i] as u16);
                d
            }
        }
    }
    #[inline(always)]
    fn gf32(&self, r: Rg) -> [f32; 32] {
        let v = self.g32(r);
        let mut d = [0f32; 32];
        lanes!(d, i => f32::from_bits(v[i]));
        d
    }
    #[inline(always)]
    fn gf64(&self, r: Rg) -> [f64; 32] {
        let v = self.g64(r);
        let mut d = [0f64; 32];
        lanes!(d, i => f64::from_bits(v[i]));
        d
    }
    /// Writes 32-bit values (zero-extended into a 64-bit register, truncated into a 16-bit).
    #[inline(always)]
    fn s32(&mut self, r: Rg, v: &[u32; 32], m: u32) {
        match r.cls {
            Cls::R32 => blend(&mut self.r32[r.idx as usize], v, m),
            Cls::R64 => {
                let d = &mut self.r64[r.idx as usize];
                for i in Bits(m) {
                    d[i] = v[i] as u64;
                }
            }
            Cls::R16 => {
                let d = &mut self.r16[r.idx as usize];
                for i in Bits(m) {
                    d[i] = v[i] as u16;
                }
            }
            Cls::K => {}
        }
    }
    /// Writes 64-bit values, truncated to the register's width.
    #[inline(always)]
    fn s64(&mut self, r: Rg, v: &[u64; 32], m: u32) {
        match r.cls {
            Cls::R64 => blend(&mut self.r64[r.idx as usize], v, m),
            Cls::R32 => {
                let d = &mut self.r32[r.idx as usize];
                for i in Bits(m) {
                    d[i] = v[i] as u32;
                }
            }
            Cls::R16 => {
                let d = &mut self.r16[r.idx as usize];
                for i in Bits(m) {
                    d[i] = v[i] as u16;
                }
            }
            Cls::K => {}
        }
    }
    #[inline(always)]
    fn s16(&mut self, r: Rg, v: &[u16; 32], m: u32) {
        match r.cls {
            Cls::R16 => blend(&mut self.r16[r.idx as usize], v, m),
            _ => {
                let mut w = [0u64; 32];
                lanes!(w, i => v[i] as u64);
                self.s64(r, &w, m)
            }
        }
    }
    #[inline(always)]
    fn sf32(&mut self, r: Rg, v: &[f32; 32], m: u32) {
        let mut b = [0u32; 32];
        lanes!(b, i => v[i].to_bits());
        self.s32(r, &b, m)
    }
    #[inline(always)]
    fn sf64(&mut self, r: Rg, v: &[f64; 32], m: u32) {
        let mut b = [0u64; 32];
        lanes!(b, i => v[i].to_bits());
        self.s64(r, &b, m)
    }
    #[inline(always)]
    fn pv(&self, p: Pr) -> u32 {
        let v = self.p[p.idx as usize];
        if p.neg {
            !v
        } else {
            v
        }
    }
    #[inline(always)]
    fn sp(&mut self, d: u16, v: u32, m: u32) {
        if d == NO_PRED {
            return;
        }
        let x = &mut self.p[d as usize];
        *x = (*x & !m) | (v & m);
    }
}

/// A queued cp.async: performed at the wait that completes its group.
#[derive(Clone, Copy)]
struct CpOp {
    lane: u8,
    size: u8,
    src_size: u8,
    group: u32,
    dst: u32,
    src: *const u8,
}

pub struct Warp {
    regs: Regs,
    /// Lanes that exist (the last warp of a CTA may be partial).
    exists: u32,
    /// Lanes that have not exited.
    live: u32,
    /// Lanes waiting at a CTA barrier.
    blocked: u32,
    /// Lanes waiting at a warp collective for the rest of its members.
    waiting: u32,
    /// bar.red predicate of each blocked lane.
    bar_pred: u32,
    /// All runnable lanes are at `pc` (then `lpc` is stale for them).
    uniform: bool,
    pc: u32,
    lpc: [u32; 32],
    ret: Vec<[u32; 32]>,
    local: Vec<u8>,
    cp: Vec<CpOp>,
    committed: [u32; 32],
}

impl Warp {
    fn new() -> Warp {
        Warp {
            regs: Regs::default(),
            exists: 0,
            live: 0,
            blocked: 0,
            waiting: 0,
            bar_pred: 0,
            uniform: true,
            pc: 0,
            lpc: [0; 32],
            ret: Vec::new(),
            local: Vec::new(),
            cp: Vec::new(),
            committed: [0; 32],
        }
    }

    #[inline]
    fn deuniform(&mut self) {
        if self.uniform {
            let run = self.live & !self.blocked;
            for l in Bits(run) {
                self.lpc[l] = self.pc;
            }
            self.uniform = false;
        }
    }

    /// `mask` lanes move on from `pc`: those in `taken` to `target`, the rest to pc + 1.
    #[inline]
    fn advance(&mut self, mask: u32, taken: u32, target: u32, pc: u32) {
        if self.uniform {
            if taken == 0 {
                self.pc = pc + 1;
                return;
            }
            if taken == mask {
                self.pc = target;
                return;
            }
            self.deuniform();
        }
        for l in Bits(mask & !taken) {
            self.lpc[l] = pc + 1;
        }
        for l in Bits(taken) {
            self.lpc[l] = target;
        }
    }
}

/// Shared memory of a CTA and its racecheck shadow.
struct Smem {
    data: Vec<u8>,
    /// Per 2-byte unit: low 32 bits the last write (epoch << 6 | warp), high 32 the reads
    /// (warp 63: several warps).
    shadow: Vec<u64>,
    epoch: u32,
    race: bool,
}

const MULTI: u32 = 63;

impl Smem {
    /// Records an access of `len` bytes at `off` by warp `w`; the hazard if another warp
    /// touched the bytes since the last barrier.
    #[inline]
    fn track(&mut self, w: u32, off: u64, len: u64, write: bool) -> Option<(&'static str, u32)> {
        let e = self.epoch;
        let first = (off / 2) as usize;
        let last = ((off + len.max(1) - 1) / 2) as usize;
        for u in first..=last.min(self.shadow.len().saturating_sub(1)) {
            let s = self.shadow[u];
            let (mut wr, mut rd) = (s as u32, (s >> 32) as u32);
            if wr >> 6 == e && wr & 63 != w {
                return Some((
                    if write {
                        "write after write"
                    } else {
                        "read after write"
                    },
                    wr & 63,
                ));
            }
            if write {
                if rd >> 6 == e && rd & 63 != w {
                    let other = if rd & 63 == MULTI { u32::MAX } else { rd & 63 };
                    return Some(("write after read", other));
                }
                wr = (e << 6) | w;
            } else if rd >> 6 == e {
                if rd & 63 != w {
                    rd = (e << 6) | MULTI;
                }
            } else {
                rd = (e << 6) | w;
            }
            self.shadow[u] = (wr as u64) | ((rd as u64) << 32);
        }
        None
    }
}

/// One worker's CTA state, reused from CTA to CTA.
pub struct Cta {
    warps: Vec<Warp>,
    smem: Smem,
    /// The last global allocation touched (base, end, host pointer).
    span: (u64, u64, *mut u8),
}

// SAFETY: the raw pointers (span cache, queued cp.async sources) point into allocations kept
// alive by the launch's MemView; a Cta is only used by one thread at a time.
unsafe impl Send for Cta {}

impl Default for Cta {
    fn default() -> Self {
        Cta::new()
    }
}

fn sext(v: u64, bits: u32) -> u64 {
    if bits >= 64 {
        v
    } else {
        (((v << (64 - bits)) as i64) >> (64 - bits)) as u64
    }
}

fn trunc(v: u64, bits: u32) -> u64 {
    if bits >= 64 {
        v
    } else {
        v & ((1u64 << bits) - 1)
    }
}

/// The value of an integer of type `t` held in the low bits of `v`.
fn ival(v: u64, t: IT) -> i128 {
    let b = t.bits();
    if t.signed() {
        sext(v, b) as i64 as i128
    } else {
        trunc(v, b) as i128
    }
}

fn irange(t: IT) -> (i128, i128) {
    let b = t.bits();
    if t.signed() {
        (-(1i128 << (b - 1)), (1i128 << (b - 1)) - 1)
    } else {
        (0, (1i128 << b) - 1)
    }
}

/// An integer of type `t` as the bits of a register (sign- or zero-extended to 64).
fn ibits(x: i128, t: IT) -> u64 {
    let v = trunc(x as u64, t.bits());
    if t.signed() {
        sext(v, t.bits())
    } else {
        v
    }
}

/// Float to integer type `t`: saturating, NaN to 0.
fn f2i(x: f64, t: IT) -> u64 {
    if x.is_nan() {
        return 0;
    }
    let (lo, hi) = irange(t);
    let v = if x <= lo as f64 {
        lo
    } else if x >= hi as f64 {
        hi
    } else {
        x as i128
    };
    ibits(v, t)
}

/// Scalar integer op at any width (the 16-bit and generic path).
fn int_op(op: IOp, t: IT, a: u64, b: u64) -> u64 {
    let bits = t.bits();
    let (x, y) = (ival(a, t), ival(b, t));
    let r: i128 = match op {
        IOp::Add => x + y,
        IOp::Sub => x - y,
        IOp::MulLo => x.wrapping_mul(y),
        IOp::MulHi if !t.signed() => {
            return ((a as u128 * b as u128) >> bits) as u64 & trunc(u64::MAX, bits)
        }
        IOp::MulHi => (x * y) >> bits,
        IOp::And => return trunc(a & b, bits),
        IOp::Or => return trunc(a | b, bits),
        IOp::Xor => return trunc(a ^ b, bits),
        IOp::Shl => {
            let s = b as u32;
            return if s >= bits { 0 } else { trunc(a << s, bits) };
        }
        IOp::Shr => {
            let s = (b as u32).min(bits);
            if t.signed() {
                x >> s.min(bits - 1)
            } else if s >= bits {
                0
            } else {
                x >> s
            }
        }
        IOp::Min => x.min(y),
        IOp::Max => x.max(y),
        IOp::Div => {
            if y == 0 {
                return trunc(u64::MAX, bits);
            }
            x / y
        }
        IOp::Rem => {
            if y == 0 {
                return trunc(a, bits);
            }
            x % y
        }
    };
    trunc(r as u64, bits)
}

impl Cta {
    pub fn new() -> Cta {
        Cta {
            warps: Vec::new(),
            smem: Smem {
                data: Vec::new(),
                shadow: Vec::new(),
                epoch: 1,
                race: false,
            },
            span: (0, 0, std::ptr::null_mut()),
        }
    }

    fn setup(&mut self, l: &Launch, cta: [u32; 3]) {
        let p = l.prog;
        let nthreads = (l.block[0] * l.block[1] * l.block[2]) as usize;
        let nw = nthreads.div_ceil(32);
        while self.warps.len() < nw {
            self.warps.push(Warp::new());
        }
        // The span cache belongs to the previous launch's view: another device's memory may
        // use the same addresses, and the region may since have been freed.
        self.span = (0, 0, std::ptr::null_mut());
        let smem_bytes = p.dyn_smem_off as usize + l.dyn_smem as usize;
        self.smem.data.clear();
        self.smem.data.resize(smem_bytes, crate::mem::FRESH);
        self.smem.race = l.racecheck;
        self.smem.epoch = 1;
        if l.racecheck {
            self.smem.shadow.clear();
            self.smem.shadow.resize(smem_bytes.div_ceil(2), 0);
        }
        for (wi, w) in self.warps[..nw].iter_mut().enumerate() {
            let first = wi * 32;
            let n = (nthreads - first).min(32);
            w.exists = if n == 32 { FULL } else { (1u32 << n) - 1 };
            w.live = w.exists;
            w.blocked = 0;
            w.waiting = 0;
            w.bar_pred = 0;
            w.uniform = true;
            w.pc = 0;
            w.lpc = [0; 32];
            // Registers keep whatever the previous CTA left (as on a GPU, unwritten registers
            // are undefined): zeroing a 1024-thread CTA's files would cost more than small CTAs
            // run.
            let r = &mut w.regs;
            r.r16.resize(p.n16.max(r.r16.len()), [0; 32]);
            r.r32.resize(p.n32.max(r.r32.len()), [0; 32]);
            r.r64.resize(p.n64.max(r.r64.len()), [0; 32]);
            r.p.resize(p.npred.max(r.p.len()), 0);
            r.p[0] = 0;
            r.p[1] = FULL;
            r.k.clear();
            r.k.extend_from_slice(l.consts);
            for &(idx, sp) in &p.specials {
                let v: [u32; 32] = std::array::from_fn(|lane| {
                    let t = (first + lane) as u32;
                    let (bx, by) = (l.block[0], l.block[1]);
                    let tid = [t % bx, (t / bx) % by, t / (bx * by)];
                    match sp {
                        Special::Tid(c) => tid[c as usize],
                        Special::Ntid(c) => l.block[c as usize],
                        Special::Ctaid(c) => cta[c as usize],
                        Special::Nctaid(c) => l.grid[c as usize],
                        Special::LaneId => lane as u32,
                        Special::WarpId => wi as u32,
                        Special::NWarpId => nw as u32,
                        Special::LaneMaskEq => 1u32 << lane,
                        Special::LaneMaskLt => (1u32 << lane) - 1,
                        Special::LaneMaskLe => ((1u64 << (lane + 1)) - 1) as u32,
                        Special::LaneMaskGt => !(((1u64 << (lane + 1)) - 1) as u32),
                        Special::LaneMaskGe => !((1u32 << lane) - 1),
                    }
                });
                r.r32[idx as usize] = v;
            }
            w.ret.clear();
            w.ret.resize(p.nslots, [0; 32]);
            w.local.clear();
            w.local
                .resize(p.local_bytes as usize * 32, crate::mem::FRESH);
            w.cp.clear();
            w.committed = [0; 32];
        }
    }

    /// Runs CTA `cta` to completion; the warp-instructions it executed.
    pub fn run(&mut self, l: &Launch, cta: [u32; 3]) -> Result<u64, Fail> {
        self.setup(l, cta);
        let nthreads = (l.block[0] * l.block[1] * l.block[2]) as usize;
        let nw = nthreads.div_ceil(32);
        let mut count = 0u64;
        loop {
            for wi in 0..nw {
                if self.warps[wi].live & !self.warps[wi].blocked != 0 {
                    self.run_warp(l, wi, &mut count)?;
                }
            }
            if l.stop.load(Ordering::Relaxed) {
                return Err(Fail {
                    stopped: true,
                    ..fail(FaultKind::Trap, 0, 0, 0, None, String::new())
                });
            }
            // Every warp is blocked or done: complete the barrier, or finish.
            let mut at: Option<(u32, usize, usize)> = None;
            for (wi, w) in self.warps[..nw].iter().enumerate() {
                for lane in Bits(w.live) {
                    let pc = w.lpc[lane];
                    match at {
                        None => at = Some((pc, wi, lane)),
                        Some((p0, w0, l0)) if p0 != pc => {
                            let (a, b) = (&l.prog.code[p0 as usize], &l.prog.code[pc as usize]);
                            let tid = |w: usize, ln: usize| self.tid(l, w, ln);
                            let id = |i: &Inst| match i.op {
                                Op::Bar { id, .. } => id,
                                _ => 0,
                            };
                            return Err(fail(
                                FaultKind::Synccheck,
                                wi,
                                lane,
                                pc,
                                None,
                                format!(
                                    "barrier divergence: thread {:?} waits at barrier {} (PTX line \
                                     {}) while thread {:?} waits at barrier {} (PTX line {}): a \
                                     barrier not reached by every live thread of the CTA",
                                    tid(wi, lane),
                                    id(b),
                                    b.line,
                                    tid(w0, l0),
                                    id(a),
                                    a.line
                                ),
                            ));
                        }
                        _ => {}
                    }
                }
            }
            let Some((pc, _, _)) = at else {
                return Ok(count);
            };
            let red = match &l.prog.code[pc as usize].op {
                Op::Bar { red, .. } => *red,
                _ => None,
            };
            let any = self.warps[..nw].iter().any(|w| w.bar_pred & w.blocked != 0);
            for w in &mut self.warps[..nw] {
                if let Some((d, _)) = red {
                    let b = w.blocked;
                    w.regs.sp(d, if any { FULL } else { 0 }, b);
                }
                for lane in Bits(w.blocked) {
                    w.lpc[lane] += 1;
                }
                w.blocked = 0;
                w.bar_pred = 0;
                w.uniform = false;
            }
            self.smem.epoch += 1;
        }
    }

    fn tid(&self, l: &Launch, w: usize, lane: usize) -> [u32; 3] {
        let t = (w * 32 + lane) as u32;
        let (bx, by) = (l.block[0], l.block[1]);
        [t % bx, (t / bx) % by, t / (bx * by)]
    }

    fn run_warp(&mut self, l: &Launch, wi: usize, count: &mut u64) -> Result<(), Fail> {
        let prog = l.prog;
        let code = &prog.code[..];
        let mut n_local = 0u64;
        // Split borrows: the warp, shared memory and the span cache.
        let mut span = self.span;
        let Cta { warps, smem, .. } = self;
        let w = &mut warps[wi];
        let res = (|| -> Result<(), Fail> {
            loop {
                let run = w.live & !w.blocked;
                let cand = run & !w.waiting;
                if cand == 0 {
                    if w.waiting != 0 {
                        return Err(stuck_collective(w, wi, code));
                    }
                    return Ok(());
                }
                let (pc, mask) = if w.uniform {
                    (w.pc, cand)
                } else {
                    let mut min = u32::MAX;
                    for ln in Bits(cand) {
                        min = min.min(w.lpc[ln]);
                    }
                    let mut mask = 0u32;
                    for ln in Bits(run) {
                        if w.lpc[ln] == min {
                            mask |= 1 << ln;
                        }
                    }
                    if mask == run && w.waiting == 0 {
                        w.uniform = true;
                        w.pc = min;
                    }
                    (min, mask)
                };
                let inst = &code[pc as usize];
                let m = mask & w.regs.pv(inst.guard);
                n_local += 1;
                if n_local & 0xffff == 0 && l.stop.load(Ordering::Relaxed) {
                    return Err(Fail {
                        stopped: true,
                        ..fail(FaultKind::Trap, wi, 0, pc, None, String::new())
                    });
                }
                let first = |m: u32| m.trailing_zeros() as usize;
                macro_rules! memfail {
                    ($lane:expr, $addr:expr, $($fmt:tt)*) => {
                        return Err(fail(FaultKind::Memcheck, wi, $lane, pc, Some($addr), format!($($fmt)*)))
                    };
                }
                match &inst.op {
                    Op::Mov { d, a } => {
                        match d.cls {
                            Cls::R32 => {
                                let v = w.regs.g32(*a);
                                w.regs.s32(*d, &v, m);
                            }
                            Cls::R64 => {
                                let v = w.regs.g64(*a);
                                w.regs.s64(*d, &v, m);
                            }
                            _ => {
                                let v = w.regs.g16(*a);
                                w.regs.s16(*d, &v, m);
                            }
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Pack { d, parts, n, bits } => {
                        let mut r = [0u64; 32];
                        for (k, part) in parts.iter().enumerate().take(*n as usize) {
                            let v = w.regs.g64(*part);
                            let sh = k as u32 * *bits as u32;
                            lanes!(r, i => r[i] | (trunc(v[i], *bits as u32) << sh));
                        }
                        w.regs.s64(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Unpack { s, parts, n, bits } => {
                        let v = w.regs.g64(*s);
                        for (k, part) in parts.iter().enumerate().take(*n as usize) {
                            let sh = k as u32 * *bits as u32;
                            let mut r = [0u64; 32];
                            lanes!(r, i => trunc(v[i] >> sh, *bits as u32));
                            w.regs.s64(*part, &r, m);
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Int { op, ty, d, a, b } => {
                        match ty.bits() {
                            32 => {
                                let x = w.regs.g32(*a);
                                let y = w.regs.g32(*b);
                                let mut r = [0u32; 32];
                                let s = ty.signed();
                                match op {
                                    IOp::Add => lanes!(r, i => x[i].wrapping_add(y[i])),
                                    IOp::Sub => lanes!(r, i => x[i].wrapping_sub(y[i])),
                                    IOp::MulLo => lanes!(r, i => x[i].wrapping_mul(y[i])),
                                    IOp::And => lanes!(r, i => x[i] & y[i]),
                                    IOp::Or => lanes!(r, i => x[i] | y[i]),
                                    IOp::Xor => lanes!(r, i => x[i] ^ y[i]),
                                    IOp::Shl => {
                                        lanes!(r, i => if y[i] >= 32 { 0 } else { x[i] << y[i] })
                                    }
                                    IOp::Shr if s => {
                                        lanes!(r, i => ((x[i] as i32) >> y[i].min(31)) as u32)
                                    }
                                    IOp::Shr => {
                                        lanes!(r, i => if y[i] >= 32 { 0 } else { x[i] >> y[i] })
                                    }
                                    IOp::Min if s => {
                                        lanes!(r, i => (x[i] as i32).min(y[i] as i32) as u32)
                                    }
                                    IOp::Max if s => {
                                        lanes!(r, i => (x[i] as i32).max(y[i] as i32) as u32)
                                    }
                                    IOp::Min => lanes!(r, i => x[i].min(y[i])),
                                    IOp::Max => lanes!(r, i => x[i].max(y[i])),
                                    _ => {
                                        lanes!(r, i => int_op(*op, *ty, x[i] as u64, y[i] as u64) as u32)
                                    }
                                }
                                w.regs.s32(*d, &r, m);
                            }
                            64 => {
                                let x = w.regs.g64(*a);
                                let s = ty.signed();
                                let mut r = [0u64; 32];
                                if matches!(op, IOp::Shl | IOp::Shr) {
                                    let y = w.regs.g32(*b);
                                    match op {
                                        IOp::Shl => {
                                            lanes!(r, i => if y[i] >= 64 { 0 } else { x[i] << y[i] })
                                        }
                                        _ if s => {
                                            lanes!(r, i => ((x[i] as i64) >> y[i].min(63)) as u64)
                                        }
                                        _ => {
                                            lanes!(r, i => if y[i] >= 64 { 0 } else { x[i] >> y[i] })
                                        }
                                    }
                                } else {
                                    let y = w.regs.g64(*b);
                                    match op {
                                        IOp::Add => lanes!(r, i => x[i].wrapping_add(y[i])),
                                        IOp::Sub => lanes!(r, i => x[i].wrapping_sub(y[i])),
                                        IOp::MulLo => lanes!(r, i => x[i].wrapping_mul(y[i])),
                                        IOp::And => lanes!(r, i => x[i] & y[i]),
                                        IOp::Or => lanes!(r, i => x[i] | y[i]),
                                        IOp::Xor => lanes!(r, i => x[i] ^ y[i]),
                                        IOp::Min if s => {
                                            lanes!(r, i => (x[i] as i64).min(y[i] as i64) as u64)
                                        }
                                        IOp::Max if s => {
                                            lanes!(r, i => (x[i] as i64).max(y[i] as i64) as u64)
                                        }
                                        IOp::Min => lanes!(r, i => x[i].min(y[i])),
                                        IOp::Max => lanes!(r, i => x[i].max(y[i])),
                                        _ => lanes!(r, i => int_op(*op, *ty, x[i], y[i])),
                                    }
                                }
                                w.regs.s64(*d, &r, m);
                            }
                            _ => {
                                let x = w.regs.g64(*a);
                                let y = w.regs.g64(*b);
                                let mut r = [0u64; 32];
                                lanes!(r, i => ibits(int_op(*op, *ty, x[i], y[i]) as i128, *ty));
                                w.regs.s64(*d, &r, m);
                            }
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::IntUn { op, ty, d, a } => {
                        let x = w.regs.g64(*a);
                        let bits = ty.bits();
                        let mut r = [0u64; 32];
                        lanes!(r, i => {
                            let v = trunc(x[i], bits);
                            match op {
                                IUn::Neg => trunc(v.wrapping_neg(), bits),
                                IUn::Not => trunc(!v, bits),
                                IUn::Abs => trunc(ival(v, *ty).unsigned_abs() as u64, bits),
                                IUn::Popc => v.count_ones() as u64,
                                IUn::Clz => (v.leading_zeros() - (64 - bits)) as u64,
                                IUn::Brev => v.reverse_bits() >> (64 - bits),
                            }
                        });
                        w.regs.s64(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Mad { hi, ty, d, a, b, c } => {
                        let x = w.regs.g64(*a);
                        let y = w.regs.g64(*b);
                        let z = w.regs.g64(*c);
                        let op = if *hi { IOp::MulHi } else { IOp::MulLo };
                        let mut r = [0u64; 32];
                        if ty.bits() == 32 && !hi {
                            lanes!(r, i => (x[i] as u32).wrapping_mul(y[i] as u32).wrapping_add(z[i] as u32) as u64);
                        } else {
                            lanes!(r, i => int_op(IOp::Add, *ty, int_op(op, *ty, x[i], y[i]), z[i]));
                        }
                        w.regs.s64(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Wide { ty, d, a, b, c } => {
                        let x = w.regs.g64(*a);
                        let y = w.regs.g64(*b);
                        let z = w.regs.g64(*c);
                        let mut r = [0u64; 32];
                        let wt = match ty {
                            IT::S16 => IT::S32,
                            IT::U16 => IT::U32,
                            IT::S32 => IT::S64,
                            _ => IT::U64,
                        };
                        lanes!(r, i => ibits(ival(x[i], *ty) * ival(y[i], *ty) + ival(z[i], wt), wt));
                        w.regs.s64(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Bfi {
                        wide,
                        d,
                        a,
                        b,
                        pos,
                        len,
                    } => {
                        let x = w.regs.g64(*a);
                        let y = w.regs.g64(*b);
                        let p = w.regs.g32(*pos);
                        let n = w.regs.g32(*len);
                        let wb: u32 = if *wide { 64 } else { 32 };
                        let mut r = [0u64; 32];
                        lanes!(r, i => {
                            let (ps, ln) = (p[i] & 0xff, n[i] & 0xff);
                            let base = trunc(y[i], wb);
                            if ln == 0 || ps >= wb {
                                base
                            } else {
                                let fm = if ln >= 64 { u64::MAX } else { (1u64 << ln) - 1 };
                                let mk = trunc(fm << ps, wb);
                                (base & !mk) | (trunc(x[i] << ps, wb) & mk)
                            }
                        });
                        w.regs.s64(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::F32 {
                        op,
                        rnd,
                        ftz,
                        sat,
                        d,
                        a,
                        b,
                    } => {
                        let x = w.regs.gf32(*a);
                        let y = w.regs.gf32(*b);
                        let mut r = [0f32; 32];
                        if !*ftz && !*sat && *rnd == Rnd::Rn {
                            match op {
                                FOp::Add => lanes!(r, i => x[i] + y[i]),
                                FOp::Sub => lanes!(r, i => x[i] - y[i]),
                                FOp::Mul => lanes!(r, i => x[i] * y[i]),
                                FOp::Div => lanes!(r, i => x[i] / y[i]),
                                FOp::Min => lanes!(r, i => min32(x[i], y[i])),
                                FOp::Max => lanes!(r, i => max32(x[i], y[i])),
                            }
                        } else {
                            lanes!(r, i => {
                                let (mut p, mut q) = (x[i], y[i]);
                                if *ftz {
                                    p = ftz32(p);
                                    q = ftz32(q);
                                }
                                let mut z = match op {
                                    FOp::Add => add32(p, q, *rnd),
                                    FOp::Sub => add32(p, -q, *rnd),
                                    FOp::Mul => mul32(p, q, *rnd),
                                    FOp::Div => p / q,
                                    FOp::Min => min32(p, q),
                                    FOp::Max => max32(p, q),
                                };
                                if *ftz {
                                    z = ftz32(z);
                                }
                                if *sat {
                                    z = sat32(z);
                                }
                                z
                            });
                        }
                        w.regs.sf32(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Fma32 {
                        rnd,
                        ftz,
                        sat,
                        d,
                        a,
                        b,
                        c,
                    } => {
                        let x = w.regs.gf32(*a);
                        let y = w.regs.gf32(*b);
                        let z = w.regs.gf32(*c);
                        let mut r = [0f32; 32];
                        if !*ftz && !*sat && *rnd == Rnd::Rn {
                            fma_rn_lanes(&x, &y, &z, &mut r);
                        } else if !*ftz && !*sat {
                            lanes!(r, i => fma32(x[i], y[i], z[i], *rnd));
                        } else {
                            lanes!(r, i => {
                                let (p, q, s) = if *ftz {
                                    (ftz32(x[i]), ftz32(y[i]), ftz32(z[i]))
                                } else {
                                    (x[i], y[i], z[i])
                                };
                                let mut v = fma32(p, q, s, *rnd);
                                if *ftz {
                                    v = ftz32(v);
                                }
                                if *sat {
                                    v = sat32(v);
                                }
                                v
                            });
                        }
                        w.regs.sf32(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::F32Un { op, ftz, sat, d, a } => {
                        let x = w.regs.gf32(*a);
                        let mut r = [0f32; 32];
                        lanes!(r, i => {
                            let p = if *ftz { ftz32(x[i]) } else { x[i] };
                            let mut z = match op {
                                FUn::Neg => -p,
                                FUn::Abs => p.abs(),
                                FUn::Sqrt => p.sqrt(),
                                FUn::Rcp => 1.0 / p,
                                FUn::Ex2Approx => exp2_f64(p as f64) as f32,
                                FUn::RcpApprox => (1.0 / p as f64) as f32,
                                FUn::SqrtApprox => (p as f64).sqrt() as f32,
                                FUn::RsqrtApprox => (1.0 / (p as f64).sqrt()) as f32,
                                FUn::Lg2Approx => (p as f64).log2() as f32,
                                FUn::SinApprox => (p as f64).sin() as f32,
                                FUn::CosApprox => (p as f64).cos() as f32,
                            };
                            if *ftz {
                                z = ftz32(z);
                            }
                            if *sat {
                                z = sat32(z);
                            }
                            z
                        });
                        w.regs.sf32(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::F64 { op, d, a, b } => {
                        let x = w.regs.gf64(*a);
                        let y = w.regs.gf64(*b);
                        let mut r = [0f64; 32];
                        match op {
                            FOp::Add => lanes!(r, i => x[i] + y[i]),
                            FOp::Sub => lanes!(r, i => x[i] - y[i]),
                            FOp::Mul => lanes!(r, i => x[i] * y[i]),
                            FOp::Div => lanes!(r, i => x[i] / y[i]),
                            FOp::Min => lanes!(r, i => min64(x[i], y[i])),
                            FOp::Max => lanes!(r, i => max64(x[i], y[i])),
                        }
                        w.regs.sf64(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Fma64 { d, a, b, c } => {
                        let x = w.regs.gf64(*a);
                        let y = w.regs.gf64(*b);
                        let z = w.regs.gf64(*c);
                        let mut r = [0f64; 32];
                        for i in Bits(m) {
                            r[i] = x[i].mul_add(y[i], z[i]);
                        }
                        w.regs.sf64(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::F64Un { op, ftz, d, a } => {
                        let x = w.regs.gf64(*a);
                        let mut r = [0f64; 32];
                        lanes!(r, i => {
                            let p = if *ftz { ftz64(x[i]) } else { x[i] };
                            let z = match op {
                                FUn::Neg => -p,
                                FUn::Abs => p.abs(),
                                FUn::Sqrt | FUn::SqrtApprox => p.sqrt(),
                                FUn::Rcp | FUn::RcpApprox => 1.0 / p,
                                FUn::RsqrtApprox => 1.0 / p.sqrt(),
                                FUn::Lg2Approx => p.log2(),
                                FUn::Ex2Approx => p.exp2(),
                                FUn::SinApprox => p.sin(),
                                FUn::CosApprox => p.cos(),
                            };
                            if *ftz { ftz64(z) } else { z }
                        });
                        w.regs.sf64(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Setp {
                        cmp,
                        ty,
                        ftz,
                        bop,
                        d,
                        dq,
                        a,
                        b,
                        c,
                    } => {
                        let mut t = 0u32;
                        match ty {
                            CT::F32 | CT::F64 => {
                                let (x, y): ([f64; 32], [f64; 32]) = if *ty == CT::F32 {
                                    let (x, y) = (w.regs.gf32(*a), w.regs.gf32(*b));
                                    let fl = |v: f32| if *ftz { ftz32(v) as f64 } else { v as f64 };
                                    let (mut p, mut q) = ([0f64; 32], [0f64; 32]);
                                    lanes!(p, i => fl(x[i]));
                                    lanes!(q, i => fl(y[i]));
                                    (p, q)
                                } else {
                                    (w.regs.gf64(*a), w.regs.gf64(*b))
                                };
                                for i in 0..32 {
                                    let (p, q) = (x[i], y[i]);
                                    let un = p.is_nan() || q.is_nan();
                                    let v = match cmp {
                                        Cmp::Eq => p == q,
                                        Cmp::Ne => !un && p != q,
                                        Cmp::Lt => p < q,
                                        Cmp::Le => p <= q,
                                        Cmp::Gt => p > q,
                                        Cmp::Ge => p >= q,
                                        Cmp::Equ => un || p == q,
                                        Cmp::Neu => p != q,
                                        Cmp::Ltu => un || p < q,
                                        Cmp::Leu => un || p <= q,
                                        Cmp::Gtu => un || p > q,
                                        Cmp::Geu => un || p >= q,
                                        Cmp::Num => !un,
                                        Cmp::Nan => un,
                                    };
                                    t |= (v as u32) << i;
                                }
                            }
                            CT::I(it) if it.bits() == 32 => {
                                let (x, y) = (w.regs.g32(*a), w.regs.g32(*b));
                                let s = it.signed();
                                for i in 0..32 {
                                    let v = if s {
                                        let (p, q) = (x[i] as i32, y[i] as i32);
                                        cmp_int(*cmp, p.cmp(&q))
                                    } else {
                                        cmp_int(*cmp, x[i].cmp(&y[i]))
                                    };
                                    t |= (v as u32) << i;
                                }
                            }
                            CT::I(it) => {
                                let (x, y) = (w.regs.g64(*a), w.regs.g64(*b));
                                for i in 0..32 {
                                    let v = cmp_int(*cmp, ival(x[i], *it).cmp(&ival(y[i], *it)));
                                    t |= (v as u32) << i;
                                }
                            }
                        }
                        let cv = w.regs.pv(*c);
                        let comb = |x: u32| match bop {
                            BoolOp::And => x & cv,
                            BoolOp::Or => x | cv,
                            BoolOp::Xor => x ^ cv,
                        };
                        w.regs.sp(*d, comb(t), m);
                        w.regs.sp(*dq, comb(!t), m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Selp { d, a, b, c } => {
                        let cv = w.regs.pv(*c);
                        if d.cls == Cls::R32 {
                            let (x, y) = (w.regs.g32(*a), w.regs.g32(*b));
                            let mut r = [0u32; 32];
                            lanes!(r, i => if cv >> i & 1 != 0 { x[i] } else { y[i] });
                            w.regs.s32(*d, &r, m);
                        } else {
                            let (x, y) = (w.regs.g64(*a), w.regs.g64(*b));
                            let mut r = [0u64; 32];
                            lanes!(r, i => if cv >> i & 1 != 0 { x[i] } else { y[i] });
                            w.regs.s64(*d, &r, m);
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::PLogic { op, d, a, b } => {
                        let (x, y) = (w.regs.pv(*a), w.regs.pv(*b));
                        let v = match op {
                            BoolOp::And => x & y,
                            BoolOp::Or => x | y,
                            BoolOp::Xor => x ^ y,
                        };
                        w.regs.sp(*d, v, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Cvt { k, d, a } => {
                        exec_cvt(&mut w.regs, *k, *d, *a, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::CvtX2 {
                        bf16,
                        relu,
                        d,
                        a,
                        b,
                    } => {
                        let (x, y) = (w.regs.gf32(*a), w.regs.gf32(*b));
                        let conv = |v: f32| {
                            let v = if *relu && v < 0.0 { 0.0 } else { v };
                            (if *bf16 { f32_to_bf16(v) } else { f32_to_f16(v) }) as u32
                        };
                        let mut r = [0u32; 32];
                        lanes!(r, i => (conv(x[i]) << 16) | conv(y[i]));
                        w.regs.s32(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Ld {
                        sp,
                        size,
                        sext: sx,
                        n,
                        d,
                        base,
                        off,
                    } => {
                        let bases = w.regs.g64(*base);
                        let (size, n) = (*size as u64, *n as usize);
                        let total = size * n as u64;
                        let mut vals = [[0u64; 32]; 4];
                        for lane in Bits(m) {
                            let a = bases[lane].wrapping_add(*off as u64);
                            match sp {
                                MS::Global => {
                                    if a % total != 0 {
                                        memfail!(
                                            lane,
                                            a,
                                            "misaligned {total}-byte global load at {a:#x}"
                                        );
                                    }
                                    let p = match gptr_in(&mut span, l.mem, a, total) {
                                        Ok(p) => p,
                                        Err(f) => memfail!(
                                            lane,
                                            a,
                                            "invalid {total}-byte global load: {f}"
                                        ),
                                    };
                                    for (k, v) in vals.iter_mut().enumerate().take(n) {
                                        // SAFETY: p..p+total is inside a live allocation and aligned.
                                        v[lane] = unsafe { gload(p.add(k * size as usize), size) };
                                    }
                                }
                                MS::Shared => {
                                    if a % total != 0 {
                                        memfail!(lane, a, "misaligned {total}-byte shared load at shared address {a:#x}");
                                    }
                                    if a.checked_add(total)
                                        .is_none_or(|e| e > smem.data.len() as u64)
                                    {
                                        memfail!(lane, a, "{total}-byte shared load at shared address {a:#x} is out of bounds of the CTA's {} bytes of shared memory", smem.data.len());
                                    }
                                    if smem.race {
                                        if let Some(h) = smem.track(wi as u32, a, total, false) {
                                            return Err(race(wi, lane, pc, a, h));
                                        }
                                    }
                                    for (k, v) in vals.iter_mut().enumerate().take(n) {
                                        let o = (a + k as u64 * size) as usize;
                                        v[lane] = le(&smem.data[o..o + size as usize]);
                                    }
                                }
                                MS::Local => {
                                    let lb = prog.local_bytes as u64;
                                    if a % total != 0 {
                                        memfail!(lane, a, "misaligned {total}-byte local load at local address {a:#x}");
                                    }
                                    if a.checked_add(total).is_none_or(|e| e > lb) {
                                        memfail!(lane, a, "{total}-byte local load at local address {a:#x} is out of bounds of the thread's {lb}-byte frame");
                                    }
                                    for (k, v) in vals.iter_mut().enumerate().take(n) {
                                        let o = (lane as u64 * lb + a + k as u64 * size) as usize;
                                        v[lane] = le(&w.local[o..o + size as usize]);
                                    }
                                }
                                MS::KParam => {
                                    if a.checked_add(total)
                                        .is_none_or(|e| e > l.params.len() as u64)
                                    {
                                        memfail!(lane, a, "kernel parameter read of {total} bytes at offset {a} is past the {}-byte parameter buffer", l.params.len());
                                    }
                                    for (k, v) in vals.iter_mut().enumerate().take(n) {
                                        let o = (a + k as u64 * size) as usize;
                                        v[lane] = le(&l.params[o..o + size as usize]);
                                    }
                                }
                            }
                        }
                        for (k, v) in vals.iter_mut().enumerate().take(n) {
                            if *sx {
                                for x in v.iter_mut() {
                                    *x = sext(*x, size as u32 * 8);
                                }
                            }
                            w.regs.s64(d[k], v, m);
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::St {
                        sp,
                        size,
                        n,
                        s,
                        base,
                        off,
                    } => {
                        let bases = w.regs.g64(*base);
                        let (size, n) = (*size as u64, *n as usize);
                        let total = size * n as u64;
                        let mut vals = [[0u64; 32]; 4];
                        for k in 0..n {
                            vals[k] = w.regs.g64(s[k]);
                        }
                        for lane in Bits(m) {
                            let a = bases[lane].wrapping_add(*off as u64);
                            match sp {
                                MS::Global => {
                                    if a % total != 0 {
                                        memfail!(
                                            lane,
                                            a,
                                            "misaligned {total}-byte global store at {a:#x}"
                                        );
                                    }
                                    let p = match gptr_in(&mut span, l.mem, a, total) {
                                        Ok(p) => p,
                                        Err(f) => memfail!(
                                            lane,
                                            a,
                                            "invalid {total}-byte global store: {f}"
                                        ),
                                    };
                                    for (k, v) in vals.iter().enumerate().take(n) {
                                        // SAFETY: p..p+total is inside a live allocation and aligned.
                                        unsafe { gstore(p.add(k * size as usize), size, v[lane]) };
                                    }
                                }
                                MS::Shared => {
                                    if a % total != 0 {
                                        memfail!(lane, a, "misaligned {total}-byte shared store at shared address {a:#x}");
                                    }
                                    if a.checked_add(total)
                                        .is_none_or(|e| e > smem.data.len() as u64)
                                    {
                                        memfail!(lane, a, "{total}-byte shared store at shared address {a:#x} is out of bounds of the CTA's {} bytes of shared memory", smem.data.len());
                                    }
                                    if smem.race {
                                        if let Some(h) = smem.track(wi as u32, a, total, true) {
                                            return Err(race(wi, lane, pc, a, h));
                                        }
                                    }
                                    for (k, v) in vals.iter().enumerate().take(n) {
                                        let o = (a + k as u64 * size) as usize;
                                        smem.data[o..o + size as usize].copy_from_slice(
                                            &v[lane].to_le_bytes()[..size as usize],
                                        );
                                    }
                                }
                                MS::Local => {
                                    let lb = prog.local_bytes as u64;
                                    if a % total != 0 {
                                        memfail!(lane, a, "misaligned {total}-byte local store at local address {a:#x}");
                                    }
                                    if a.checked_add(total).is_none_or(|e| e > lb) {
                                        memfail!(lane, a, "{total}-byte local store at local address {a:#x} is out of bounds of the thread's {lb}-byte frame");
                                    }
                                    for (k, v) in vals.iter().enumerate().take(n) {
                                        let o = (lane as u64 * lb + a + k as u64 * size) as usize;
                                        w.local[o..o + size as usize].copy_from_slice(
                                            &v[lane].to_le_bytes()[..size as usize],
                                        );
                                    }
                                }
                                MS::KParam => unreachable!("rejected at decode"),
                            }
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Atom {
                        sp,
                        op,
                        ty,
                        d,
                        b,
                        c,
                        base,
                        off,
                    } => {
                        let bases = w.regs.g64(*base);
                        let bv = w.regs.g64(*b);
                        let cv = w.regs.g64(*c);
                        let size: u64 = match ty {
                            AT::U32 | AT::S32 | AT::F32 => 4,
                            _ => 8,
                        };
                        let mut old = [0u64; 32];
                        for lane in Bits(m) {
                            let a = bases[lane].wrapping_add(*off as u64);
                            if a % size != 0 {
                                memfail!(lane, a, "misaligned {size}-byte atomic at {a:#x}");
                            }
                            match sp {
                                MS::Global => {
                                    let p = match gptr_in(&mut span, l.mem, a, size) {
                                        Ok(p) => p,
                                        Err(f) => memfail!(
                                            lane,
                                            a,
                                            "invalid {size}-byte global atomic: {f}"
                                        ),
                                    };
                                    // SAFETY: aligned and inside a live allocation.
                                    old[lane] = unsafe { gatomic(p, *op, *ty, bv[lane], cv[lane]) };
                                }
                                MS::Shared => {
                                    if a.checked_add(size)
                                        .is_none_or(|e| e > smem.data.len() as u64)
                                    {
                                        memfail!(lane, a, "{size}-byte shared atomic at shared address {a:#x} is out of bounds of the CTA's {} bytes of shared memory", smem.data.len());
                                    }
                                    let o = a as usize;
                                    let cur = le(&smem.data[o..o + size as usize]);
                                    let new = atom_apply(*op, *ty, cur, bv[lane], cv[lane]);
                                    smem.data[o..o + size as usize]
                                        .copy_from_slice(&new.to_le_bytes()[..size as usize]);
                                    old[lane] = cur;
                                }
                                _ => memfail!(
                                    lane,
                                    a,
                                    "atomics on this state space are not supported"
                                ),
                            }
                        }
                        w.regs.s64(*d, &old, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Cvta { to, sp, d, a } => {
                        let x = w.regs.g64(*a);
                        let win = match sp {
                            MS::Local => LOCAL_WINDOW,
                            MS::Shared => SHARED_WINDOW,
                            _ => 0,
                        };
                        let mut r = [0u64; 32];
                        if *to {
                            lanes!(r, i => x[i].wrapping_sub(win));
                        } else {
                            lanes!(r, i => x[i].wrapping_add(win));
                        }
                        w.regs.s64(*d, &r, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Bra { target } => {
                        w.advance(mask, m, *target, pc);
                    }
                    Op::Call { target, slot } => {
                        let rs = &mut w.ret[*slot as usize];
                        for lane in Bits(m) {
                            rs[lane] = pc + 1;
                        }
                        w.advance(mask, m, *target, pc);
                    }
                    Op::Ret { slot } if *slot != u16::MAX => {
                        let rs = w.ret[*slot as usize];
                        let t = rs[first(m.max(1))];
                        if m != 0 && Bits(m).all(|ln| rs[ln] == t) {
                            w.advance(mask, m, t, pc);
                        } else {
                            w.deuniform();
                            for ln in Bits(mask & !m) {
                                w.lpc[ln] = pc + 1;
                            }
                            for ln in Bits(m) {
                                w.lpc[ln] = rs[ln];
                            }
                        }
                    }
                    Op::Ret { .. } | Op::Exit => {
                        if m != mask {
                            w.deuniform();
                            for ln in Bits(mask & !m) {
                                w.lpc[ln] = pc + 1;
                            }
                        }
                        w.live &= !m;
                        w.waiting &= !m;
                    }
                    Op::Trap => {
                        if m != 0 {
                            return Err(fail(
                                FaultKind::Trap,
                                wi,
                                first(m),
                                pc,
                                None,
                                "trap instruction executed".into(),
                            ));
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Nop => w.advance(mask, 0, 0, pc),
                    Op::Bar { red, .. } => {
                        w.deuniform();
                        for ln in Bits(mask & !m) {
                            w.lpc[ln] = pc + 1;
                        }
                        w.blocked |= m;
                        if let Some((_, c)) = red {
                            let cv = w.regs.pv(*c);
                            w.bar_pred = (w.bar_pred & !m) | (cv & m);
                        }
                    }
                    Op::Shfl {
                        mode,
                        d,
                        p,
                        a,
                        b,
                        c,
                        mask: mk,
                    } => {
                        let mkv = w.regs.g32(*mk);
                        let mut need = 0u32;
                        for ln in Bits(m) {
                            if mkv[ln] >> ln & 1 == 0 {
                                return Err(fail(FaultKind::Synccheck, wi, ln, pc, None, format!(
                                    "shfl.sync: lane {ln} is not in its own member mask {:#010x}", mkv[ln])));
                            }
                            need |= mkv[ln];
                        }
                        if !collective_ready(w, wi, pc, mask, m, need, code)? {
                            continue;
                        }
                        let av = w.regs.g32(*a);
                        let bv = w.regs.g32(*b);
                        let cv = w.regs.g32(*c);
                        let mut r = [0u32; 32];
                        let mut pv = 0u32;
                        for ln in Bits(m) {
                            let lane = ln as u32;
                            let bval = bv[ln] & 31;
                            let cval = cv[ln] & 31;
                            let seg = (cv[ln] >> 8) & 31;
                            let max_lane = (lane & seg) | (cval & !seg);
                            let min_lane = lane & seg;
                            let (j, ok) = match mode {
                                ShflMode::Up => {
                                    let j = lane as i32 - bval as i32;
                                    (j, j >= max_lane as i32)
                                }
                                ShflMode::Down => {
                                    let j = (lane + bval) as i32;
                                    (j, j <= max_lane as i32)
                                }
                                ShflMode::Bfly => {
                                    let j = (lane ^ bval) as i32;
                                    (j, j <= max_lane as i32)
                                }
                                ShflMode::Idx => {
                                    let j = (min_lane | (bval & !seg)) as i32;
                                    (j, j <= max_lane as i32)
                                }
                            };
                            let j = if ok { j as usize } else { ln };
                            r[ln] = av[j];
                            pv |= (ok as u32) << ln;
                        }
                        w.regs.s32(*d, &r, m);
                        w.regs.sp(*p, pv, m);
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::WarpSync { mask: mk } => {
                        let mkv = w.regs.g32(*mk);
                        let mut need = 0u32;
                        for ln in Bits(m) {
                            if mkv[ln] >> ln & 1 == 0 {
                                return Err(fail(FaultKind::Synccheck, wi, ln, pc, None, format!(
                                    "bar.warp.sync: lane {ln} is not in its own member mask {:#010x}", mkv[ln])));
                            }
                            need |= mkv[ln];
                        }
                        if !collective_ready(w, wi, pc, mask, m, need, code)? {
                            continue;
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Mma { i } => {
                        if !collective_ready(w, wi, pc, mask, m, FULL, code)? {
                            continue;
                        }
                        let ops = &prog.mmas[*i as usize];
                        let dv = if ops[4..].iter().all(|r| r.cls == Cls::R32) {
                            let f = &w.regs.r32;
                            let g = |k: usize| &f[ops[k].idx as usize];
                            mma_m16n8k16_bf16(
                                [g(4), g(5), g(6), g(7)],
                                [g(8), g(9)],
                                [g(10), g(11), g(12), g(13)],
                            )
                        } else {
                            let v: [[u32; 32]; 10] =
                                [4, 5, 6, 7, 8, 9, 10, 11, 12, 13].map(|k| w.regs.g32(ops[k]));
                            mma_m16n8k16_bf16(
                                [&v[0], &v[1], &v[2], &v[3]],
                                [&v[4], &v[5]],
                                [&v[6], &v[7], &v[8], &v[9]],
                            )
                        };
                        for k in 0..4 {
                            w.regs.s32(ops[k], &dv[k], FULL);
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::Ldmatrix {
                        trans,
                        n,
                        d,
                        base,
                        off,
                    } => {
                        if !collective_ready(w, wi, pc, mask, m, FULL, code)? {
                            continue;
                        }
                        let bases = w.regs.g64(*base);
                        let nm = *n as usize;
                        // rows[i][r]: the 16 bytes of row r of matrix i
                        let mut rows = [[[0u8; 16]; 8]; 4];
                        for (i, mrows) in rows.iter_mut().enumerate().take(nm) {
                            for (r, row) in mrows.iter_mut().enumerate() {
                                let lane = i * 8 + r;
                                let a = bases[lane].wrapping_add(*off as u64);
                                if a % 16 != 0 {
                                    memfail!(lane, a, "ldmatrix: misaligned row address {a:#x} (rows must be 16-byte aligned)");
                                }
                                if a.checked_add(16).is_none_or(|e| e > smem.data.len() as u64) {
                                    memfail!(lane, a, "ldmatrix: row at shared address {a:#x} is out of bounds of the CTA's {} bytes of shared memory", smem.data.len());
                                }
                                if smem.race {
                                    if let Some(h) = smem.track(wi as u32, a, 16, false) {
                                        return Err(race(wi, lane, pc, a, h));
                                    }
                                }
                                row.copy_from_slice(&smem.data[a as usize..a as usize + 16]);
                            }
                        }
                        let h16 = |row: &[u8; 16], c: usize| {
                            u16::from_le_bytes([row[2 * c], row[2 * c + 1]]) as u32
                        };
                        for (i, mrows) in rows.iter().enumerate().take(nm) {
                            let mut r = [0u32; 32];
                            for (ln, x) in r.iter_mut().enumerate() {
                                let (g, t) = (ln / 4, ln % 4);
                                *x = if *trans {
                                    h16(&mrows[2 * t], g) | (h16(&mrows[2 * t + 1], g) << 16)
                                } else {
                                    h16(&mrows[g], 2 * t) | (h16(&mrows[g], 2 * t + 1) << 16)
                                };
                            }
                            w.regs.s32(d[i], &r, FULL);
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::CpAsync {
                        size,
                        dbase,
                        doff,
                        sbase,
                        soff,
                        src_size,
                    } => {
                        let db = w.regs.g64(*dbase);
                        let sb = w.regs.g64(*sbase);
                        let ss = w.regs.g32(*src_size);
                        let sz = *size as u64;
                        for lane in Bits(m) {
                            let da = db[lane].wrapping_add(*doff as u64);
                            let sa = sb[lane].wrapping_add(*soff as u64);
                            let n = ss[lane] as u64;
                            if n > sz {
                                memfail!(lane, sa, "cp.async: src-size {n} exceeds cp-size {sz}");
                            }
                            if da % sz != 0 {
                                memfail!(
                                    lane,
                                    da,
                                    "cp.async: misaligned {sz}-byte shared destination {da:#x}"
                                );
                            }
                            if da
                                .checked_add(sz)
                                .is_none_or(|e| e > smem.data.len() as u64)
                            {
                                memfail!(lane, da, "cp.async: {sz}-byte destination at shared address {da:#x} is out of bounds of the CTA's {} bytes of shared memory", smem.data.len());
                            }
                            let mut src = std::ptr::null();
                            if n > 0 {
                                if sa % sz != 0 {
                                    memfail!(
                                        lane,
                                        sa,
                                        "cp.async: misaligned {sz}-byte global source {sa:#x}"
                                    );
                                }
                                src = match gptr_in(&mut span, l.mem, sa, n) {
                                    Ok(p) => p as *const u8,
                                    Err(f) => memfail!(
                                        lane,
                                        sa,
                                        "cp.async: invalid {n}-byte global read: {f}"
                                    ),
                                };
                            }
                            w.cp.push(CpOp {
                                lane: lane as u8,
                                size: *size,
                                src_size: n as u8,
                                group: w.committed[lane],
                                dst: da as u32,
                                src,
                            });
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::CpCommit => {
                        for lane in Bits(m) {
                            w.committed[lane] += 1;
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                    Op::CpWait { n } => {
                        if !w.cp.is_empty() {
                            let thr: [u32; 32] =
                                std::array::from_fn(|ln| w.committed[ln].saturating_sub(*n));
                            let mut keep = 0;
                            for k in 0..w.cp.len() {
                                let c = w.cp[k];
                                let ln = c.lane as usize;
                                if m >> ln & 1 != 0 && c.group < thr[ln] {
                                    // lands now: the global data as it is at this moment
                                    let (o, sz, ns) =
                                        (c.dst as usize, c.size as usize, c.src_size as usize);
                                    if smem.race {
                                        if let Some(h) =
                                            smem.track(wi as u32, o as u64, sz as u64, true)
                                        {
                                            return Err(race(wi, ln, pc, o as u64, h));
                                        }
                                    }
                                    let dst = &mut smem.data[o..o + sz];
                                    dst.fill(0);
                                    let mut b = 0;
                                    while b < ns {
                                        if b + 4 <= ns {
                                            // SAFETY: src..src+ns was checked live at issue (the view keeps it
                                            // alive) and src is aligned to the copy size, so to 4.
                                            let v = unsafe {
                                                (*(c.src.add(b) as *const AtomicU32))
                                                    .load(Ordering::Relaxed)
                                            };
                                            dst[b..b + 4].copy_from_slice(&v.to_le_bytes());
                                            b += 4;
                                        } else {
                                            // SAFETY: as above, one byte.
                                            dst[b] = unsafe {
                                                (*(c.src.add(b) as *const AtomicU8))
                                                    .load(Ordering::Relaxed)
                                            };
                                            b += 1;
                                        }
                                    }
                                } else {
                                    w.cp[keep] = c;
                                    keep += 1;
                                }
                            }
                            w.cp.truncate(keep);
                        }
                        w.advance(mask, 0, 0, pc);
                    }
                }
            }
        })();
        *count += n_local;
        self.span = span;
        res
    }
}

/// fma.rn.f32 over a warp: one hardware FMA per lane where the CPU has it (correctly rounded
/// either way).
#[inline]
fn fma_rn_lanes(x: &[f32; 32], y: &[f32; 32], z: &[f32; 32], r: &mut [f32; 32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has FMA and AVX2 (checked just above).
        unsafe { fma_rn_lanes_hw(x, y, z, r) };
        return;
    }
    lanes!(r, i => fma32(x[i], y[i], z[i], Rnd::Rn));
}

/// # Safety
/// The CPU must have FMA and AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn fma_rn_lanes_hw(x: &[f32; 32], y: &[f32; 32], z: &[f32; 32], r: &mut [f32; 32]) {
    lanes!(r, i => x[i].mul_add(y[i], z[i]));
}

fn cmp_int(c: Cmp, o: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match c {
        Cmp::Eq => o == Equal,
        Cmp::Ne => o != Equal,
        Cmp::Lt => o == Less,
        Cmp::Le => o != Greater,
        Cmp::Gt => o == Greater,
        Cmp::Ge => o != Less,
        _ => false,
    }
}

fn race(wi: usize, lane: usize, pc: u32, a: u64, (what, other): (&str, u32)) -> Fail {
    let who = if other == u32::MAX {
        "other warps".to_string()
    } else {
        format!("warp {other}")
    };
    fail(
        FaultKind::Racecheck,
        wi,
        lane,
        pc,
        Some(a),
        format!(
            "shared memory hazard ({what}) at shared address {a:#x}: warp {wi} and {who} \
             access it with no barrier between them"
        ),
    )
}

/// The synccheck error of a warp whose runnable lanes all wait at collectives: where the
/// lanes they wait for are instead.
fn stuck_collective(w: &Warp, wi: usize, code: &[Inst]) -> Fail {
    let lane = w.waiting.trailing_zeros() as usize;
    let pc = w.lpc[lane];
    let here = Bits(w.waiting)
        .filter(|&l| w.lpc[l] == pc)
        .fold(0u32, |m, l| m | 1 << l);
    let mut whys = Vec::new();
    let gone = w.exists & !w.live;
    if gone != 0 {
        whys.push(format!("lanes {gone:#010x} have exited"));
    }
    let barrier = w.live & w.blocked;
    if barrier != 0 {
        whys.push(format!("lanes {barrier:#010x} wait at a CTA barrier"));
    }
    let mut elsewhere: Vec<(u32, u32)> = Vec::new();
    for l in Bits(w.waiting & !here) {
        match elsewhere.iter_mut().find(|(p, _)| *p == w.lpc[l]) {
            Some(e) => e.1 |= 1 << l,
            None => elsewhere.push((w.lpc[l], 1 << l)),
        }
    }
    for (p, m) in elsewhere {
        whys.push(format!(
            "lanes {m:#010x} wait at another collective (PTX line {})",
            code[p as usize].line
        ));
    }
    fail(
        FaultKind::Synccheck,
        wi,
        lane,
        pc,
        None,
        format!(
            "warp collective at PTX line {}: lanes {here:#010x} of warp {wi} wait for the rest \
             of their member mask, but {}",
            code[pc as usize].line,
            whys.join(", ")
        ),
    )
}

/// Whether a warp collective whose members are `need` can run with the lanes `m` at it; if
/// not, those lanes wait (the others move on). Members that have exited make it an error.
#[inline]
fn collective_ready(
    w: &mut Warp,
    wi: usize,
    pc: u32,
    mask: u32,
    m: u32,
    need: u32,
    code: &[Inst],
) -> Result<bool, Fail> {
    if need & !m == 0 {
        w.waiting &= !m;
        return Ok(true);
    }
    let gone = need & !w.live;
    if gone != 0 {
        let lane = m.trailing_zeros().min(31) as usize;
        let what = if need & !w.exists != 0 {
            format!(
                "lanes {:#010x} do not exist in this (partial) warp",
                need & !w.exists
            )
        } else {
            format!("lanes {gone:#010x} have exited")
        };
        return Err(fail(
            FaultKind::Synccheck,
            wi,
            lane,
            pc,
            None,
            format!(
                "warp collective at PTX line {} needs lanes {need:#010x} of warp {wi}, but {what}",
                code[pc as usize].line
            ),
        ));
    }
    w.deuniform();
    for ln in Bits(mask & !m) {
        w.lpc[ln] = pc + 1;
    }
    w.waiting |= m;
    Ok(false)
}

fn gptr_in(
    span: &mut (u64, u64, *mut u8),
    mem: &MemView,
    addr: u64,
    len: u64,
) -> Result<*mut u8, Fault> {
    let (b, e, p) = *span;
    if addr >= b && addr.checked_add(len).is_some_and(|x| x <= e) {
        // SAFETY: within the cached live span.
        return Ok(unsafe { p.add((addr - b) as usize) });
    }
    match mem.span_of(addr) {
        Some(s) if addr.checked_add(len).is_some_and(|end| end <= s.1) => {
            *span = s;
            // SAFETY: within the span just found.
            Ok(unsafe { s.2.add((addr - s.0) as usize) })
        }
        _ => Err(match mem.translate(addr, len) {
            Err(f) => f,
            Ok(_) => Fault::Unmapped { addr, len },
        }),
    }
}

fn le(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(x)
}

/// A relaxed atomic load (CTAs on other threads may write neighbouring bytes).
///
/// # Safety
/// `p` must be valid for `size` bytes and aligned to `size`.
#[inline]
unsafe fn gload(p: *const u8, size: u64) -> u64 {
    // SAFETY: the caller guarantees validity and alignment.
    unsafe {
        match size {
            1 => (*(p as *const AtomicU8)).load(Ordering::Relaxed) as u64,
            2 => (*(p as *const AtomicU16)).load(Ordering::Relaxed) as u64,
            4 => (*(p as *const AtomicU32)).load(Ordering::Relaxed) as u64,
            _ => (*(p as *const AtomicU64)).load(Ordering::Relaxed),
        }
    }
}

/// # Safety
/// `p` must be valid for `size` bytes and aligned to `size`.
#[inline]
unsafe fn gstore(p: *mut u8, size: u64, v: u64) {
    // SAFETY: the caller guarantees validity and alignment.
    unsafe {
        match size {
            1 => (*(p as *const AtomicU8)).store(v as u8, Ordering::Relaxed),
            2 => (*(p as *const AtomicU16)).store(v as u16, Ordering::Relaxed),
            4 => (*(p as *const AtomicU32)).store(v as u32, Ordering::Relaxed),
            _ => (*(p as *const AtomicU64)).store(v, Ordering::Relaxed),
        }
    }
}

/// The new value of an atomic location.
fn atom_apply(op: AOp, ty: AT, cur: u64, b: u64, c: u64) -> u64 {
    let bits = match ty {
        AT::U32 | AT::S32 | AT::F32 => 32,
        _ => 64,
    };
    let it = match ty {
        AT::U32 => IT::U32,
        AT::S32 => IT::S32,
        AT::U64 => IT::U64,
        _ => IT::S64,
    };
    match (op, ty) {
        (AOp::Add, AT::F32) => {
            // atom.add.f32 rounds to nearest and flushes subnormals (PTX ISA)
            let v = ftz32(ftz32(f32::from_bits(cur as u32)) + ftz32(f32::from_bits(b as u32)));
            v.to_bits() as u64
        }
        (AOp::Add, AT::F64) => (f64::from_bits(cur) + f64::from_bits(b)).to_bits(),
        (AOp::Exch, _) => trunc(b, bits),
        (AOp::Cas, _) => {
            if trunc(cur, bits) == trunc(b, bits) {
                trunc(c, bits)
            } else {
                cur
            }
        }
        (AOp::Inc, _) => {
            let (x, y) = (cur as u32, b as u32);
            (if x >= y { 0 } else { x + 1 }) as u64
        }
        (AOp::Dec, _) => {
            let (x, y) = (cur as u32, b as u32);
            (if x == 0 || x > y { y } else { x - 1 }) as u64
        }
        (AOp::Add, _) => int_op(IOp::Add, it, cur, b),
        (AOp::Min, _) => int_op(IOp::Min, it, cur, b),
        (AOp::Max, _) => int_op(IOp::Max, it, cur, b),
        (AOp::And, _) => cur & b,
        (AOp::Or, _) => trunc(cur | b, bits),
        (AOp::Xor, _) => trunc(cur ^ b, bits),
    }
}

/// A global atomic: a compare-and-swap loop on the host memory.
///
/// # Safety
/// `p` must be valid and aligned for the type's size.
unsafe fn gatomic(p: *mut u8, op: AOp, ty: AT, b: u64, c: u64) -> u64 {
    // SAFETY: the caller guarantees validity and alignment.
    unsafe {
        match ty {
            AT::U32 | AT::S32 | AT::F32 => {
                let a = &*(p as *const AtomicU32);
                let mut cur = a.load(Ordering::Relaxed);
                loop {
                    let new = atom_apply(op, ty, cur as u64, b, c) as u32;
                    match a.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                        Ok(_) => return cur as u64,
                        Err(x) => cur = x,
                    }
                }
            }
            _ => {
                let a = &*(p as *const AtomicU64);
                let mut cur = a.load(Ordering::Relaxed);
                loop {
                    let new = atom_apply(op, ty, cur, b, c);
                    match a.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                        Ok(_) => return cur,
                        Err(x) => cur = x,
                    }
                }
            }
        }
    }
}

fn exec_cvt(r: &mut Regs, k: Cvt, d: Rg, a: Rg, m: u32) {
    let mut out = [0u64; 32];
    match k {
        Cvt::II { from, to, sat } => {
            let x = r.g64(a);
            let (lo, hi) = irange(to);
            lanes!(out, i => {
                let v = ival(x[i], from);
                ibits(if sat { v.clamp(lo, hi) } else { v }, to)
            });
        }
        Cvt::F32ToF64 { ftz } => {
            let x = r.gf32(a);
            lanes!(out, i => (if ftz { ftz32(x[i]) } else { x[i] } as f64).to_bits());
        }
        Cvt::F64ToF32 { rnd, ftz, sat } => {
            let x = r.gf64(a);
            lanes!(out, i => {
                let mut v = if rnd == Rnd::Rn { x[i] as f32 } else { round_f32(x[i], 0.0, rnd) };
                if ftz {
                    v = ftz32(v);
                }
                if sat {
                    v = sat32(v);
                }
                v.to_bits() as u64
            });
        }
        Cvt::F32ToF32 { irnd, ftz, sat } => {
            let x = r.gf32(a);
            lanes!(out, i => {
                let mut v = if ftz { ftz32(x[i]) } else { x[i] };
                if let Some(ir) = irnd {
                    v = round_int32(v, ir);
                }
                if sat {
                    v = sat32(v);
                }
                if ftz {
                    v = ftz32(v);
                }
                v.to_bits() as u64
            });
        }
        Cvt::F64ToF64 { irnd, sat } => {
            let x = r.gf64(a);
            lanes!(out, i => {
                let mut v = x[i];
                if let Some(ir) = irnd {
                    v = round_int64(v, ir);
                }
                if sat {
                    v = sat64(v);
                }
                v.to_bits()
            });
        }
        Cvt::IToF32 { from, sat } => {
            let x = r.g64(a);
            lanes!(out, i => {
                let v = ival(x[i], from) as f32;
                (if sat { sat32(v) } else { v }).to_bits() as u64
            });
        }
        Cvt::IToF64 { from } => {
            let x = r.g64(a);
            lanes!(out, i => (ival(x[i], from) as f64).to_bits());
        }
        Cvt::F32ToI { to, irnd, ftz } => {
            let x = r.gf32(a);
            lanes!(out, i => {
                let v = if ftz { ftz32(x[i]) } else { x[i] };
                f2i(round_int32(v, irnd) as f64, to)
            });
        }
        Cvt::F64ToI { to, irnd } => {
            let x = r.gf64(a);
            lanes!(out, i => f2i(round_int64(x[i], irnd), to));
        }
        Cvt::F32ToBf16 { relu, satfinite } | Cvt::F32ToF16 { relu, satfinite } => {
            let bf = matches!(k, Cvt::F32ToBf16 { .. });
            let x = r.gf32(a);
            lanes!(out, i => {
                let mut v = x[i];
                if relu && v < 0.0 {
                    v = 0.0;
                }
                if satfinite && !v.is_nan() {
                    let max = if bf { f32::from_bits(0x7f7f_0000) } else { 65504.0 };
                    v = v.clamp(-max, max);
                }
                (if bf { f32_to_bf16(v) } else { f32_to_f16(v) }) as u64
            });
        }
        Cvt::Bf16ToF32 => {
            let x = r.g16(a);
            lanes!(out, i => bf16_to_f32(x[i]).to_bits() as u64);
        }
        Cvt::F16ToF32 { ftz } => {
            let x = r.g16(a);
            lanes!(out, i => {
                let v = f16_to_f32(x[i]);
                (if ftz { ftz32(v) } else { v }).to_bits() as u64
            });
        }
    }
    r.s64(d, &out, m);
}
