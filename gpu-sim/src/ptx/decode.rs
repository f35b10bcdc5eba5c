//! Parsed functions to programs: one per kernel (the entry plus every `.func` it calls), every
//! operand resolved to a register index, a constant-table entry or an offset, every opcode and
//! modifier checked. Anything not understood is a [`LoadError`] naming it and its line.

use super::code::*;
use super::parse::{Func, Item, PInst, POp, ParsedModule, Space, VarDecl};
use super::{LoadError, ParamInfo};
use std::collections::HashMap;

/// A decoded kernel (or, for checking, a `.func` with its callees).
#[derive(Clone, Debug, Default)]
pub struct Program {
    pub name: String,
    pub code: Vec<Inst>,
    pub mmas: Vec<[Rg; 14]>,
    pub n16: usize,
    pub n32: usize,
    pub n64: usize,
    pub npred: usize,
    /// Immediates and symbol addresses; entry 0 is 0.
    pub consts: Vec<u64>,
    /// Constants holding a module variable's address: (constant, variable in `globals()`
    /// order, addend).
    pub global_refs: Vec<(u16, usize, i64)>,
    /// Registers (32-bit file) holding special registers.
    pub specials: Vec<(u16, Special)>,
    pub params: Vec<ParamInfo>,
    pub param_bytes: usize,
    pub static_smem: u32,
    /// Where the dynamic (`.extern .shared`) array starts.
    pub dyn_smem_off: u32,
    pub local_bytes: u32,
    /// Return-address slots (one per called function).
    pub nslots: usize,
    pub max_threads: Option<u32>,
    pub req_ntid: Option<[u32; 3]>,
    pub num_regs: u32,
    /// `.loc` (file, line) by index.
    pub locs: Vec<(String, u32)>,
}

fn err<T>(line: usize, m: impl Into<String>) -> Result<T, LoadError> {
    Err(LoadError {
        line,
        message: m.into(),
    })
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a.max(1)) * a.max(1)
}

/// Types of instruction modifiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ty {
    I(IT),
    B8,
    B16,
    B32,
    B64,
    F16,
    Bf16,
    F32,
    F64,
    Pred,
    F16x2,
    Bf16x2,
}

impl Ty {
    fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "u8" => Ty::I(IT::U8),
            "s8" => Ty::I(IT::S8),
            "u16" => Ty::I(IT::U16),
            "s16" => Ty::I(IT::S16),
            "u32" => Ty::I(IT::U32),
            "s32" => Ty::I(IT::S32),
            "u64" => Ty::I(IT::U64),
            "s64" => Ty::I(IT::S64),
            "b8" => Ty::B8,
            "b16" => Ty::B16,
            "b32" => Ty::B32,
            "b64" => Ty::B64,
            "f16" => Ty::F16,
            "bf16" => Ty::Bf16,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "pred" => Ty::Pred,
            "f16x2" => Ty::F16x2,
            "bf16x2" => Ty::Bf16x2,
            _ => return None,
        })
    }
    fn bytes(self) -> u8 {
        match self {
            Ty::I(t) => (t.bits() / 8) as u8,
            Ty::B8 => 1,
            Ty::B16 | Ty::F16 | Ty::Bf16 => 2,
            Ty::B32 | Ty::F32 | Ty::F16x2 | Ty::Bf16x2 => 4,
            Ty::B64 | Ty::F64 => 8,
            Ty::Pred => 1,
        }
    }
    /// As an integer type (bit types are unsigned).
    fn int(self) -> Option<IT> {
        Some(match self {
            Ty::I(t) => t,
            Ty::B8 => IT::U8,
            Ty::B16 => IT::U16,
            Ty::B32 => IT::U32,
            Ty::B64 => IT::U64,
            _ => return None,
        })
    }
    fn is_float(self) -> bool {
        matches!(self, Ty::F32 | Ty::F64 | Ty::F16 | Ty::Bf16)
    }
}

/// What a name means inside a function.
#[derive(Clone, Debug)]
enum Sym {
    R(Rg),
    P(u16),
    /// An address in a space (local frame offsets, parameter offsets).
    Local(u64),
    KParam(u64),
}

/// Per called function: where its code, frame and parameters are.
#[derive(Clone, Debug, Default)]
struct Layout {
    slot: u16,
    pc: Option<u32>,
    locals: HashMap<String, u64>,
    params: Vec<u64>,
    rets: Vec<u64>,
}

struct Dec<'m> {
    m: &'m ParsedModule,
    p: Program,
    const_map: HashMap<u64, u16>,
    special_map: HashMap<Special, u16>,
    shared: HashMap<String, u64>,
    globals: HashMap<String, usize>,
    layouts: HashMap<String, Layout>,
    scopes: Vec<HashMap<String, Sym>>,
    /// (pc, function) of calls to patch once the callee is placed.
    call_fixups: Vec<(usize, String, usize)>,
}

/// Names of module variables that need device memory, in `globals()` order.
pub fn module_globals(m: &ParsedModule) -> Vec<&VarDecl> {
    m.vars
        .iter()
        .filter(|v| matches!(v.space, Space::Global | Space::Const) && !v.is_extern)
        .collect()
}

/// Function names a body calls.
fn callees(f: &Func) -> Vec<(String, usize)> {
    let mut v = Vec::new();
    for it in f.body.iter().flatten() {
        if let Item::Inst(pi) = it {
            if pi.opcode.split('.').next() == Some("call") {
                for op in &pi.ops {
                    if let POp::Name(n) = op {
                        v.push((n.clone(), pi.line));
                    }
                }
            }
        }
    }
    v
}

/// Names an instruction refers to (registers and symbols alike).
fn names_in(op: &POp, out: &mut Vec<String>) {
    match op {
        POp::Name(n) | POp::Not(n) => out.push(n.clone()),
        POp::Addr(Some(n), _) => out.push(n.clone()),
        POp::Vec(v) => v.iter().for_each(|o| names_in(o, out)),
        POp::Pair(a, b) => {
            out.push(a.clone());
            out.push(b.clone());
        }
        _ => {}
    }
}

/// Decodes the program rooted at `m.funcs[root]`.
pub fn build(m: &ParsedModule, root: usize) -> Result<Program, LoadError> {
    let rf = &m.funcs[root];
    // Reachable functions (root first), rejecting recursion.
    let mut order: Vec<usize> = Vec::new();
    fn visit(
        m: &ParsedModule,
        i: usize,
        stack: &mut Vec<usize>,
        order: &mut Vec<usize>,
    ) -> Result<(), LoadError> {
        if order.contains(&i) {
            return Ok(());
        }
        stack.push(i);
        let f = &m.funcs[i];
        for (c, line) in callees(f) {
            let Some(j) = m.funcs.iter().position(|g| g.name == c) else {
                return err(
                    line,
                    format!("call to `{c}`, which is not a function of the module"),
                );
            };
            if m.funcs[j].is_entry {
                return err(line, format!("call to the kernel entry `{c}`"));
            }
            if m.funcs[j].body.is_none() {
                return err(
                    line,
                    format!("call to `{c}`, which has no body in the module"),
                );
            }
            if stack.contains(&j) {
                return err(line, format!("recursive call to `{c}` (not supported)"));
            }
            visit(m, j, stack, order)?;
        }
        stack.pop();
        order.push(i);
        Ok(())
    }
    visit(m, root, &mut Vec::new(), &mut order)?;
    order.retain(|&i| i != root);
    order.insert(0, root);

    let mut d = Dec {
        m,
        p: Program {
            name: rf.name.clone(),
            consts: vec![0],
            npred: 2,
            ..Default::default()
        },
        const_map: HashMap::from([(0u64, 0u16)]),
        special_map: HashMap::new(),
        shared: HashMap::new(),
        globals: module_globals(m)
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), i))
            .collect(),
        layouts: HashMap::new(),
        scopes: Vec::new(),
        call_fixups: Vec::new(),
    };
    d.p.locs = m
        .locs
        .iter()
        .map(|&(f, l)| {
            let path = m
                .files
                .iter()
                .find(|(n, _)| *n == f)
                .map_or_else(|| format!("file{f}"), |(_, p)| p.clone());
            (path, l)
        })
        .collect();

    // Kernel parameters.
    if rf.is_entry {
        let mut off = 0u64;
        for v in &rf.params {
            off = align_up(off, v.align);
            d.p.params.push(ParamInfo {
                size: v.size.unwrap_or(0) as u32,
                align: v.align as u32,
                offset: off as u32,
            });
            off += v.size.unwrap_or(0);
        }
        d.p.param_bytes = off as usize;
        d.p.max_threads = rf.maxntid.map(|t| t.iter().product());
        d.p.req_ntid = rf.reqntid;
    }

    // Local frames and parameter areas, one fixed region per function (no recursion).
    let mut local = 0u64;
    for (k, &fi) in order.iter().enumerate() {
        let f = &m.funcs[fi];
        let mut lay = Layout {
            slot: k as u16,
            ..Default::default()
        };
        for it in f.body.iter().flatten() {
            if let Item::Var(v) = it {
                if v.space == Space::Local {
                    local = align_up(local, v.align);
                    lay.locals.insert(v.name.clone(), local);
                    local += v.size.unwrap_or(0);
                }
            }
        }
        if !f.is_entry {
            for v in &f.params {
                local = align_up(local, v.align);
                lay.params.push(local);
                local += v.size.unwrap_or(0);
            }
            for v in &f.rets {
                local = align_up(local, v.align);
                lay.rets.push(local);
                local += v.size.unwrap_or(0);
            }
        }
        d.layouts.insert(f.name.clone(), lay);
    }
    d.p.local_bytes = align_up(local, 8) as u32;
    d.p.nslots = order.len();

    // Static shared memory: the entry's own variables in order, then the module-scope ones
    // its code (or a callee's) names, then callees' own (as engine::kernel_info counts them).
    let mut used: Vec<String> = Vec::new();
    for &fi in &order {
        for it in m.funcs[fi].body.iter().flatten() {
            if let Item::Inst(pi) = it {
                for op in &pi.ops {
                    names_in(op, &mut used);
                }
            }
        }
    }
    let used: std::collections::HashSet<String> = used.into_iter().collect();
    let mut smem = 0u64;
    let mut place = |d: &mut Dec, v: &VarDecl| {
        smem = align_up(smem, v.align);
        d.shared.insert(v.name.clone(), smem);
        smem += v.size.unwrap_or(0);
    };
    let body_shared = |fi: usize| {
        m.funcs[fi]
            .body
            .iter()
            .flatten()
            .filter_map(|it| match it {
                Item::Var(v) if v.space == Space::Shared => Some(v.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    for v in body_shared(root) {
        place(&mut d, &v);
    }
    for v in &m.vars {
        if v.space == Space::Shared && !v.is_extern && v.size.is_some() && used.contains(&v.name) {
            place(&mut d, v);
        }
    }
    for &fi in &order[1..] {
        for v in body_shared(fi) {
            place(&mut d, &v);
        }
    }
    d.p.static_smem = smem as u32;
    let mut dyn_align = 16;
    for v in &m.vars {
        if v.space == Space::Shared && (v.is_extern || v.size.is_none()) {
            dyn_align = dyn_align.max(v.align);
        }
    }
    let dyn_off = align_up(smem, dyn_align);
    for v in &m.vars {
        if v.space == Space::Shared && (v.is_extern || v.size.is_none()) {
            d.shared.insert(v.name.clone(), dyn_off);
        }
    }
    d.p.dyn_smem_off = dyn_off as u32;

    // Code: the root, then each callee.
    for &fi in &order {
        d.function(fi)?;
    }
    for (pc, callee, line) in std::mem::take(&mut d.call_fixups) {
        let Some(t) = d.layouts.get(&callee).and_then(|l| l.pc) else {
            return err(line, format!("call to `{callee}`: no code"));
        };
        if let Op::Call { target, .. } = &mut d.p.code[pc].op {
            *target = t;
        }
    }
    let regs = d.p.n16 + d.p.n32 + 2 * d.p.n64;
    d.p.num_regs = regs.min(255) as u32;
    Ok(d.p)
}

impl<'m> Dec<'m> {
    fn konst(&mut self, v: u64) -> Rg {
        let n = self.p.consts.len() as u16;
        let idx = *self.const_map.entry(v).or_insert(n);
        if idx == n {
            self.p.consts.push(v);
        }
        Rg { cls: Cls::K, idx }
    }

    fn new_reg(&mut self, ty: &str, line: usize) -> Result<Sym, LoadError> {
        let (cls, n) = match ty {
            ".pred" => {
                self.p.npred += 1;
                return Ok(Sym::P((self.p.npred - 1) as u16));
            }
            ".b16" | ".u16" | ".s16" | ".f16" | ".bf16" | ".b8" | ".u8" | ".s8" => {
                (Cls::R16, &mut self.p.n16)
            }
            ".b32" | ".u32" | ".s32" | ".f32" | ".f16x2" | ".bf16x2" => (Cls::R32, &mut self.p.n32),
            ".b64" | ".u64" | ".s64" | ".f64" => (Cls::R64, &mut self.p.n64),
            _ => return err(line, format!("unsupported register type `{ty}`")),
        };
        *n += 1;
        if *n > u16::MAX as usize - 1 {
            return err(line, "too many registers");
        }
        Ok(Sym::R(Rg {
            cls,
            idx: (*n - 1) as u16,
        }))
    }

    fn special(&mut self, name: &str) -> Option<Rg> {
        let dim = |s: &str| match s {
            "x" => Some(0u8),
            "y" => Some(1),
            "z" => Some(2),
            _ => None,
        };
        let sp = if let Some((base, c)) = name.split_once('.') {
            let c = dim(c)?;
            match base {
                "%tid" => Special::Tid(c),
                "%ntid" => Special::Ntid(c),
                "%ctaid" => Special::Ctaid(c),
                "%nctaid" => Special::Nctaid(c),
                _ => return None,
            }
        } else {
            match name {
                "%laneid" => Special::LaneId,
                "%warpid" => Special::WarpId,
                "%nwarpid" => Special::NWarpId,
                "%lanemask_eq" => Special::LaneMaskEq,
                "%lanemask_lt" => Special::LaneMaskLt,
                "%lanemask_le" => Special::LaneMaskLe,
                "%lanemask_gt" => Special::LaneMaskGt,
                "%lanemask_ge" => Special::LaneMaskGe,
                _ => return None,
            }
        };
        if let Some(&i) = self.special_map.get(&sp) {
            return Some(Rg {
                cls: Cls::R32,
                idx: i,
            });
        }
        self.p.n32 += 1;
        let i = (self.p.n32 - 1) as u16;
        self.special_map.insert(sp, i);
        self.p.specials.push((i, sp));
        Some(Rg {
            cls: Cls::R32,
            idx: i,
        })
    }

    fn lookup(&self, name: &str) -> Option<&Sym> {
        self.scopes.iter().rev().find_map(|s| s.get(name))
    }

    fn function(&mut self, fi: usize) -> Result<(), LoadError> {
        let f = &self.m.funcs[fi];
        let items = f.body.as_ref().expect("reachable functions have bodies");
        let start = self.p.code.len() as u32;
        self.layouts.get_mut(&f.name).unwrap().pc = Some(start);
        let lay = self.layouts[&f.name].clone();
        // Function scope: its locals, its parameters.
        let mut top = HashMap::new();
        for (n, &o) in &lay.locals {
            top.insert(n.clone(), Sym::Local(o));
        }
        if f.is_entry {
            for (v, pi) in f.params.iter().zip(self.p.params.clone()) {
                top.insert(v.name.clone(), Sym::KParam(pi.offset as u64));
            }
        } else {
            for (v, &o) in f.params.iter().zip(&lay.params) {
                top.insert(v.name.clone(), Sym::Local(o));
            }
            for (v, &o) in f.rets.iter().zip(&lay.rets) {
                top.insert(v.name.clone(), Sym::Local(o));
            }
        }
        self.scopes = vec![top];
        let mut labels: HashMap<String, u32> = HashMap::new();
        let mut bra_fixups: Vec<(usize, String, usize)> = Vec::new();
        for (pos, it) in items.iter().enumerate() {
            match it {
                Item::Open => self.scopes.push(HashMap::new()),
                Item::Close => {
                    self.scopes.pop();
                }
                Item::Reg(ty, names, line) => {
                    for n in names {
                        let s = self.new_reg(ty, *line)?;
                        self.scopes.last_mut().unwrap().insert(n.clone(), s);
                    }
                }
                Item::Var(v) => match v.space {
                    Space::Local | Space::Shared => {} // laid out above
                    Space::Param => {
                        let s = self.call_param(items, pos, v)?;
                        self.scopes.last_mut().unwrap().insert(v.name.clone(), s);
                    }
                    _ => {
                        return err(
                            v.line,
                            format!("a function-scope {:?} variable is not supported", v.space),
                        )
                    }
                },
                Item::Label(n) => {
                    labels.insert(n.clone(), self.p.code.len() as u32);
                }
                Item::Inst(pi) => {
                    let guard = match &pi.guard {
                        None => P_TRUE,
                        Some((g, neg)) => match self.lookup(g) {
                            Some(Sym::P(i)) => Pr { idx: *i, neg: *neg },
                            _ => return err(pi.line, format!("guard `{g}` is not a predicate")),
                        },
                    };
                    let op = self.inst(pi, &mut bra_fixups)?;
                    self.p.code.push(Inst {
                        op,
                        guard,
                        line: pi.line as u32,
                        loc: pi.loc,
                    });
                }
            }
        }
        // Falling off the end of a function returns.
        let last_line = items
            .iter()
            .rev()
            .find_map(|it| match it {
                Item::Inst(pi) => Some(pi.line),
                _ => None,
            })
            .unwrap_or(f.line);
        self.p.code.push(Inst {
            op: Op::Ret {
                slot: if f.is_entry { u16::MAX } else { lay.slot },
            },
            guard: P_TRUE,
            line: last_line as u32,
            loc: u32::MAX,
        });
        for (pc, l, line) in bra_fixups {
            let Some(&t) = labels.get(&l) else {
                return err(
                    line,
                    format!("branch to `{l}`, which is not a label of `{}`", f.name),
                );
            };
            if let Op::Bra { target } = &mut self.p.code[pc].op {
                *target = t;
            }
        }
        // ret in this function returns through its slot (or exits from the entry)
        for inst in &mut self.p.code[start as usize..] {
            if let Op::Ret { slot } = &mut inst.op {
                if *slot == u16::MAX - 1 {
                    *slot = if f.is_entry { u16::MAX } else { lay.slot };
                }
            }
        }
        Ok(())
    }

    /// A `.param` declared in a call sequence: the callee parameter (or return value) that
    /// the next call in the scope passes it as.
    fn call_param(&mut self, items: &[Item], pos: usize, v: &VarDecl) -> Result<Sym, LoadError> {
        let mut depth = 0i32;
        for it in &items[pos + 1..] {
            match it {
                Item::Open => depth += 1,
                Item::Close => {
                    depth -= 1;
                    if depth < 0 {
                        break;
                    }
                }
                Item::Inst(pi) if pi.opcode.split('.').next() == Some("call") => {
                    let mut lists = Vec::new();
                    let mut callee = None;
                    for op in &pi.ops {
                        match op {
                            POp::List(l) => lists.push(l.clone()),
                            POp::Name(n) => callee = Some(n.clone()),
                            _ => {}
                        }
                    }
                    let Some(callee) = callee else { continue };
                    let (rets, args) = match lists.len() {
                        2 => (lists[0].clone(), lists[1].clone()),
                        1 if matches!(pi.ops.first(), Some(POp::List(_))) => {
                            (lists[0].clone(), vec![])
                        }
                        1 => (vec![], lists[0].clone()),
                        _ => (vec![], vec![]),
                    };
                    let lay = &self.layouts[&callee];
                    if let Some(k) = rets.iter().position(|n| *n == v.name) {
                        return lay.rets.get(k).map(|&o| Sym::Local(o)).ok_or(LoadError {
                            line: pi.line,
                            message: format!("`{callee}` has no return value {k}"),
                        });
                    }
                    if let Some(k) = args.iter().position(|n| *n == v.name) {
                        return lay.params.get(k).map(|&o| Sym::Local(o)).ok_or(LoadError {
                            line: pi.line,
                            message: format!("`{callee}` has no parameter {k}"),
                        });
                    }
                }
                _ => {}
            }
        }
        err(
            v.line,
            format!("`.param {}` is not passed to a call", v.name),
        )
    }

    // ---------------------------------------------------------------------------------------
    // operands

    fn reg(&mut self, name: &str, line: usize) -> Result<Rg, LoadError> {
        match self.lookup(name) {
            Some(Sym::R(r)) => Ok(*r),
            Some(Sym::P(_)) => err(line, format!("`{name}` is a predicate here")),
            Some(_) => err(line, format!("`{name}` is not a register")),
            None => {
                if let Some(r) = self.special(name) {
                    return Ok(r);
                }
                err(line, format!("unknown register `{name}`"))
            }
        }
    }

    fn pred(&mut self, op: &POp, line: usize) -> Result<Pr, LoadError> {
        match op {
            POp::Name(n) | POp::Not(n) => match self.lookup(n) {
                Some(Sym::P(i)) => Ok(Pr {
                    idx: *i,
                    neg: matches!(op, POp::Not(_)),
                }),
                _ => err(line, format!("`{n}` is not a predicate register")),
            },
            POp::Int(v) => Ok(Pr {
                idx: if *v != 0 { 1 } else { 0 },
                neg: false,
            }),
            _ => err(line, format!("expected a predicate, found {op:?}")),
        }
    }

    fn pred_dst(&mut self, op: &POp, line: usize) -> Result<u16, LoadError> {
        match op {
            POp::Name(n) => match self.lookup(n) {
                Some(Sym::P(i)) => Ok(*i),
                _ => err(line, format!("`{n}` is not a predicate register")),
            },
            _ => err(line, format!("expected a predicate register, found {op:?}")),
        }
    }

    /// The bits of an immediate as an operand of type `ty`.
    fn imm(&mut self, op: &POp, ty: Ty, line: usize) -> Result<Rg, LoadError> {
        let bits: u64 = match (op, ty) {
            (POp::Int(v), Ty::F32) => (*v as f32).to_bits() as u64,
            (POp::Int(v), Ty::F64) => (*v as f64).to_bits(),
            (POp::Int(v), _) => *v as i64 as u64,
            (POp::F32(b), Ty::F64) => (f32::from_bits(*b) as f64).to_bits(),
            (POp::F32(b), _) => *b as u64,
            (POp::F64(b), Ty::F32) => (f64::from_bits(*b) as f32).to_bits() as u64,
            (POp::F64(b), _) => *b,
            (POp::Dec(x), Ty::F32) => (*x as f32).to_bits() as u64,
            (POp::Dec(x), _) => x.to_bits(),
            _ => return err(line, format!("expected an immediate, found {op:?}")),
        };
        Ok(self.konst(bits))
    }

    /// The address of a symbol for `mov`: shared offset, global address or local offset.
    fn symbol_value(&mut self, name: &str, line: usize) -> Result<Option<Rg>, LoadError> {
        if let Some(&o) = self.shared.get(name) {
            return Ok(Some(self.konst(o)));
        }
        if let Some(&gi) = self.globals.get(name) {
            // a fresh constant per reference site's addend; patched at bind
            let k = self.p.consts.len() as u16;
            self.p.consts.push(0);
            self.p.global_refs.push((k, gi, 0));
            return Ok(Some(Rg {
                cls: Cls::K,
                idx: k,
            }));
        }
        match self.lookup(name) {
            Some(Sym::Local(o)) => {
                let o = *o;
                Ok(Some(self.konst(o)))
            }
            Some(Sym::KParam(_)) => err(
                line,
                format!("taking the address of kernel parameter `{name}` is not supported"),
            ),
            _ => Ok(None),
        }
    }

    /// A source operand of type `ty`: register, immediate, special register or symbol address.
    fn src(&mut self, op: &POp, ty: Ty, line: usize) -> Result<Rg, LoadError> {
        match op {
            POp::Name(n) => {
                if let Some(Sym::R(r)) = self.lookup(n) {
                    return Ok(*r);
                }
                if let Some(r) = self.special(n) {
                    return Ok(r);
                }
                if let Some(r) = self.symbol_value(n, line)? {
                    return Ok(r);
                }
                err(line, format!("unknown operand `{n}`"))
            }
            POp::Int(_) | POp::F32(_) | POp::F64(_) | POp::Dec(_) => self.imm(op, ty, line),
            _ => err(line, format!("unsupported operand {op:?}")),
        }
    }

    fn dst(&mut self, op: &POp, line: usize) -> Result<Rg, LoadError> {
        match op {
            POp::Name(n) if n == "_" => self.sink(Cls::R64),
            POp::Name(n) => self.reg(n, line),
            _ => err(
                line,
                format!("expected a destination register, found {op:?}"),
            ),
        }
    }

    fn sink(&mut self, cls: Cls) -> Result<Rg, LoadError> {
        let ty = match cls {
            Cls::R16 => ".b16",
            Cls::R32 => ".b32",
            _ => ".b64",
        };
        match self.new_reg(ty, 0)? {
            Sym::R(r) => Ok(r),
            _ => unreachable!(),
        }
    }

    /// `[base + off]` in state space `sp` (None: from the symbol).
    fn addr(
        &mut self,
        op: &POp,
        sp: Option<Space>,
        line: usize,
    ) -> Result<(MS, Rg, i64), LoadError> {
        let POp::Addr(base, off) = op else {
            return err(line, format!("expected an address `[...]`, found {op:?}"));
        };
        let off = *off;
        let space_ms = |s: Space| match s {
            Space::Global | Space::Const => MS::Global,
            Space::Shared => MS::Shared,
            Space::Local => MS::Local,
            Space::Param => MS::KParam,
        };
        let Some(name) = base else {
            let Some(s) = sp else {
                return err(line, "an absolute address needs a state space");
            };
            return Ok((space_ms(s), ZERO, off));
        };
        match self.lookup(name).cloned() {
            Some(Sym::R(r)) => {
                let Some(s) = sp else {
                    return err(
                        line,
                        "generic addressing (ld/st without a state space) is not supported",
                    );
                };
                if s == Space::Param {
                    return err(line, "a .param access through a register is not supported");
                }
                return Ok((space_ms(s), r, off));
            }
            Some(Sym::Local(o)) => {
                if !matches!(sp, Some(Space::Local) | Some(Space::Param)) {
                    return err(line, format!("`{name}` is not in the {sp:?} space"));
                }
                return Ok((MS::Local, ZERO, o as i64 + off));
            }
            Some(Sym::KParam(o)) => {
                if sp != Some(Space::Param) {
                    return err(
                        line,
                        format!("kernel parameter `{name}` read outside .param"),
                    );
                }
                return Ok((MS::KParam, ZERO, o as i64 + off));
            }
            Some(Sym::P(_)) => return err(line, format!("`{name}` is a predicate")),
            None => {}
        }
        if let Some(&o) = self.shared.get(name) {
            if sp != Some(Space::Shared) {
                return err(line, format!("shared variable `{name}` accessed as {sp:?}"));
            }
            return Ok((MS::Shared, ZERO, o as i64 + off));
        }
        if let Some(&gi) = self.globals.get(name) {
            if !matches!(sp, Some(Space::Global) | Some(Space::Const)) {
                return err(line, format!("global variable `{name}` accessed as {sp:?}"));
            }
            let k = self.p.consts.len() as u16;
            self.p.consts.push(0);
            self.p.global_refs.push((k, gi, 0));
            return Ok((
                MS::Global,
                Rg {
                    cls: Cls::K,
                    idx: k,
                },
                off,
            ));
        }
        err(line, format!("unknown address `{name}`"))
    }

    fn ops<const N: usize>(pi: &PInst) -> Result<&[POp; N], LoadError> {
        pi.ops.as_slice().try_into().map_err(|_| LoadError {
            line: pi.line,
            message: format!("`{}` takes {N} operands, found {}", pi.opcode, pi.ops.len()),
        })
    }

    // ---------------------------------------------------------------------------------------
    // instructions

    fn inst(
        &mut self,
        pi: &PInst,
        bra_fixups: &mut Vec<(usize, String, usize)>,
    ) -> Result<Op, LoadError> {
        let line = pi.line;
        let parts: Vec<&str> = pi.opcode.split('.').collect();
        let base = parts[0];
        let mods = &parts[1..];
        let unsupported = || {
            err::<Op>(
                line,
                format!(
                    "unsupported instruction `{}` (gpu-sim does not implement it)",
                    pi.opcode
                ),
            )
        };
        // Modifier scan shared by most instructions.
        let mut types: Vec<Ty> = Vec::new();
        let mut rnd: Option<Rnd> = None;
        let mut irnd: Option<IRnd> = None;
        let mut flags: Vec<&str> = Vec::new();
        for &md in mods {
            if let Some(t) = Ty::parse(md) {
                types.push(t);
                continue;
            }
            match md {
                "rn" => rnd = Some(Rnd::Rn),
                "rz" => rnd = Some(Rnd::Rz),
                "rm" => rnd = Some(Rnd::Rm),
                "rp" => rnd = Some(Rnd::Rp),
                "rni" => irnd = Some(IRnd::Rni),
                "rzi" => irnd = Some(IRnd::Rzi),
                "rmi" => irnd = Some(IRnd::Rmi),
                "rpi" => irnd = Some(IRnd::Rpi),
                _ => flags.push(md),
            }
        }
        let has = |f: &str| flags.contains(&f);
        let only = |allowed: &[&str]| -> Result<(), LoadError> {
            for f in &flags {
                if !allowed.contains(f) {
                    return err(
                        line,
                        format!(
                            "unsupported instruction `{}`: modifier `.{f}` is not implemented",
                            pi.opcode
                        ),
                    );
                }
            }
            Ok(())
        };
        let one_type = |types: &[Ty]| -> Result<Ty, LoadError> {
            match types {
                [t] => Ok(*t),
                _ => err(line, format!("`{}`: expected one type", pi.opcode)),
            }
        };

        Ok(match base {
            "mov" => {
                only(&[])?;
                let ty = one_type(&types)?;
                let [d, a] = Self::ops::<2>(pi)?;
                if ty == Ty::Pred {
                    let dd = self.pred_dst(d, line)?;
                    let pa = self.pred(a, line)?;
                    return Ok(Op::PLogic {
                        op: BoolOp::Xor,
                        d: dd,
                        a: pa,
                        b: Pr { idx: 0, neg: false },
                    });
                }
                let bits = ty.bytes() as u32 * 8;
                match (d, a) {
                    (POp::Vec(v), _) => {
                        let n = v.len();
                        if !(n == 2 || n == 4) || !(bits as usize).is_multiple_of(n) {
                            return err(line, format!("`{}` with {n} parts", pi.opcode));
                        }
                        let pb = bits as usize / n;
                        let mut parts = [ZERO; 4];
                        for (k, o) in v.iter().enumerate() {
                            parts[k] = match o {
                                POp::Name(x) if x == "_" => self.sink(Cls::R64)?,
                                _ => self.dst(o, line)?,
                            };
                        }
                        let s = self.src(a, ty, line)?;
                        Op::Unpack {
                            s,
                            parts,
                            n: n as u8,
                            bits: pb as u8,
                        }
                    }
                    (_, POp::Vec(v)) => {
                        let n = v.len();
                        if !(n == 2 || n == 4) || !(bits as usize).is_multiple_of(n) {
                            return err(line, format!("`{}` with {n} parts", pi.opcode));
                        }
                        let pb = bits as usize / n;
                        let pty = match pb {
                            8 => Ty::B8,
                            16 => Ty::B16,
                            32 => Ty::B32,
                            _ => return err(line, "bad vector mov"),
                        };
                        let mut parts = [ZERO; 4];
                        for (k, o) in v.iter().enumerate() {
                            parts[k] = self.src(o, pty, line)?;
                        }
                        let dd = self.dst(d, line)?;
                        Op::Pack {
                            d: dd,
                            parts,
                            n: n as u8,
                            bits: pb as u8,
                        }
                    }
                    _ => {
                        let dd = self.dst(d, line)?;
                        let s = self.src(a, ty, line)?;
                        Op::Mov { d: dd, a: s }
                    }
                }
            }
            "add" | "sub" | "mul" | "div" | "rem" | "min" | "max" | "and" | "or" | "xor"
            | "shl" | "shr" => {
                let ty = one_type(&types)?;
                let [d, a, b] = Self::ops::<3>(pi)?;
                if ty == Ty::Pred {
                    only(&[])?;
                    let op = match base {
                        "and" => BoolOp::And,
                        "or" => BoolOp::Or,
                        "xor" => BoolOp::Xor,
                        _ => return unsupported(),
                    };
                    let dd = self.pred_dst(d, line)?;
                    let pa = self.pred(a, line)?;
                    let pb = self.pred(b, line)?;
                    return Ok(Op::PLogic {
                        op,
                        d: dd,
                        a: pa,
                        b: pb,
                    });
                }
                if ty == Ty::F32 || ty == Ty::F64 {
                    let fop = match base {
                        "add" => FOp::Add,
                        "sub" => FOp::Sub,
                        "mul" => FOp::Mul,
                        "div" => FOp::Div,
                        "min" => FOp::Min,
                        "max" => FOp::Max,
                        _ => return unsupported(),
                    };
                    let dd = self.dst(d, line)?;
                    let sa = self.src(a, ty, line)?;
                    let sb = self.src(b, ty, line)?;
                    if ty == Ty::F64 {
                        only(&[])?;
                        if rnd.is_some_and(|r| r != Rnd::Rn) {
                            return unsupported();
                        }
                        if fop == FOp::Div && rnd.is_none() {
                            return unsupported();
                        }
                        return Ok(Op::F64 {
                            op: fop,
                            d: dd,
                            a: sa,
                            b: sb,
                        });
                    }
                    let mut r = rnd.unwrap_or(Rnd::Rn);
                    if fop == FOp::Div {
                        // div.rn (IEEE), div.full / div.approx (approximate: computed exactly here)
                        only(&["ftz", "full", "approx"])?;
                        if rnd.is_none() && !has("full") && !has("approx") {
                            return unsupported();
                        }
                        if r != Rnd::Rn {
                            return unsupported();
                        }
                        r = Rnd::Rn;
                    } else if matches!(fop, FOp::Min | FOp::Max) {
                        only(&["ftz"])?;
                    } else {
                        only(&["ftz", "sat"])?;
                    }
                    return Ok(Op::F32 {
                        op: fop,
                        rnd: r,
                        ftz: has("ftz"),
                        sat: has("sat"),
                        d: dd,
                        a: sa,
                        b: sb,
                    });
                }
                let Some(it) = ty.int() else {
                    return unsupported();
                };
                let op = match base {
                    "add" => IOp::Add,
                    "sub" => IOp::Sub,
                    "mul" => {
                        if has("wide") {
                            only(&["wide"])?;
                            if it.bits() > 32 {
                                return unsupported();
                            }
                            let dd = self.dst(d, line)?;
                            let sa = self.src(a, ty, line)?;
                            let sb = self.src(b, ty, line)?;
                            return Ok(Op::Wide {
                                ty: it,
                                d: dd,
                                a: sa,
                                b: sb,
                                c: ZERO,
                            });
                        }
                        if has("hi") {
                            IOp::MulHi
                        } else if has("lo") {
                            IOp::MulLo
                        } else {
                            return unsupported();
                        }
                    }
                    "div" => IOp::Div,
                    "rem" => IOp::Rem,
                    "min" => IOp::Min,
                    "max" => IOp::Max,
                    "and" => IOp::And,
                    "or" => IOp::Or,
                    "xor" => IOp::Xor,
                    "shl" => IOp::Shl,
                    "shr" => IOp::Shr,
                    _ => return unsupported(),
                };
                only(if base == "mul" { &["lo", "hi"] } else { &[] })?;
                if it.bits() < 16 {
                    return unsupported();
                }
                let dd = self.dst(d, line)?;
                let sa = self.src(a, ty, line)?;
                // shift amounts are .u32
                let bty = if matches!(op, IOp::Shl | IOp::Shr) {
                    Ty::I(IT::U32)
                } else {
                    ty
                };
                let sb = self.src(b, bty, line)?;
                Op::Int {
                    op,
                    ty: it,
                    d: dd,
                    a: sa,
                    b: sb,
                }
            }
            "mad" => {
                let ty = one_type(&types)?;
                let [d, a, b, c] = Self::ops::<4>(pi)?;
                let dd = self.dst(d, line)?;
                if ty == Ty::F32 || ty == Ty::F64 {
                    let Some(r) = rnd else { return unsupported() };
                    only(&["ftz", "sat"])?;
                    let sa = self.src(a, ty, line)?;
                    let sb = self.src(b, ty, line)?;
                    let sc = self.src(c, ty, line)?;
                    if ty == Ty::F64 {
                        if r != Rnd::Rn || has("ftz") || has("sat") {
                            return unsupported();
                        }
                        return Ok(Op::Fma64 {
                            d: dd,
                            a: sa,
                            b: sb,
                            c: sc,
                        });
                    }
                    return Ok(Op::Fma32 {
                        rnd: r,
                        ftz: has("ftz"),
                        sat: has("sat"),
                        d: dd,
                        a: sa,
                        b: sb,
                        c: sc,
                    });
                }
                let Some(it) = ty.int() else {
                    return unsupported();
                };
                if it.bits() < 16 {
                    return unsupported();
                }
                let sa = self.src(a, ty, line)?;
                let sb = self.src(b, ty, line)?;
                if has("wide") {
                    only(&["wide"])?;
                    if it.bits() > 32 {
                        return unsupported();
                    }
                    let wty = Ty::I(if it.signed() { IT::S64 } else { IT::U64 });
                    let sc = self.src(c, wty, line)?;
                    return Ok(Op::Wide {
                        ty: it,
                        d: dd,
                        a: sa,
                        b: sb,
                        c: sc,
                    });
                }
                only(&["lo", "hi"])?;
                if !has("lo") && !has("hi") {
                    return unsupported();
                }
                let sc = self.src(c, ty, line)?;
                Op::Mad {
                    hi: has("hi"),
                    ty: it,
                    d: dd,
                    a: sa,
                    b: sb,
                    c: sc,
                }
            }
            "fma" => {
                let ty = one_type(&types)?;
                let Some(r) = rnd else { return unsupported() };
                let [d, a, b, c] = Self::ops::<4>(pi)?;
                let dd = self.dst(d, line)?;
                let sa = self.src(a, ty, line)?;
                let sb = self.src(b, ty, line)?;
                let sc = self.src(c, ty, line)?;
                match ty {
                    Ty::F32 => {
                        only(&["ftz", "sat"])?;
                        Op::Fma32 {
                            rnd: r,
                            ftz: has("ftz"),
                            sat: has("sat"),
                            d: dd,
                            a: sa,
                            b: sb,
                            c: sc,
                        }
                    }
                    Ty::F64 if r == Rnd::Rn => {
                        only(&[])?;
                        Op::Fma64 {
                            d: dd,
                            a: sa,
                            b: sb,
                            c: sc,
                        }
                    }
                    _ => return unsupported(),
                }
            }
            "neg" | "abs" | "not" | "popc" | "clz" | "brev" | "sqrt" | "rcp" | "ex2" | "rsqrt"
            | "lg2" | "sin" | "cos" => {
                let ty = one_type(&types)?;
                let [d, a] = Self::ops::<2>(pi)?;
                if ty == Ty::Pred {
                    only(&[])?;
                    if base != "not" {
                        return unsupported();
                    }
                    let dd = self.pred_dst(d, line)?;
                    let mut pa = self.pred(a, line)?;
                    pa.neg = !pa.neg;
                    return Ok(Op::PLogic {
                        op: BoolOp::Xor,
                        d: dd,
                        a: pa,
                        b: Pr { idx: 0, neg: false },
                    });
                }
                let dd = self.dst(d, line)?;
                let sa = self.src(a, ty, line)?;
                if ty == Ty::F32 || ty == Ty::F64 {
                    let approx = has("approx");
                    let op = match (base, approx) {
                        ("neg", false) => FUn::Neg,
                        ("abs", false) => FUn::Abs,
                        ("sqrt", false) if rnd == Some(Rnd::Rn) => FUn::Sqrt,
                        ("rcp", false) if rnd == Some(Rnd::Rn) => FUn::Rcp,
                        ("sqrt", true) => FUn::SqrtApprox,
                        ("rcp", true) => FUn::RcpApprox,
                        ("ex2", true) => FUn::Ex2Approx,
                        ("rsqrt", true) => FUn::RsqrtApprox,
                        ("lg2", true) => FUn::Lg2Approx,
                        ("sin", true) => FUn::SinApprox,
                        ("cos", true) => FUn::CosApprox,
                        _ => return unsupported(),
                    };
                    if ty == Ty::F64 {
                        only(&["approx", "ftz"])?;
                        let ok = match op {
                            FUn::Neg | FUn::Abs | FUn::Sqrt | FUn::Rcp => !has("ftz"),
                            FUn::RcpApprox | FUn::RsqrtApprox => has("ftz"),
                            _ => false,
                        };
                        if !ok {
                            return unsupported();
                        }
                        return Ok(Op::F64Un {
                            op,
                            ftz: has("ftz"),
                            d: dd,
                            a: sa,
                        });
                    }
                    only(&["approx", "ftz", "sat"])?;
                    if has("sat") {
                        return unsupported();
                    }
                    return Ok(Op::F32Un {
                        op,
                        ftz: has("ftz"),
                        sat: false,
                        d: dd,
                        a: sa,
                    });
                }
                only(&[])?;
                let Some(it) = ty.int() else {
                    return unsupported();
                };
                if it.bits() < 16 {
                    return unsupported();
                }
                let op = match base {
                    "neg" => IUn::Neg,
                    "abs" => IUn::Abs,
                    "not" => IUn::Not,
                    "popc" => IUn::Popc,
                    "clz" => IUn::Clz,
                    "brev" => IUn::Brev,
                    _ => return unsupported(),
                };
                Op::IntUn {
                    op,
                    ty: it,
                    d: dd,
                    a: sa,
                }
            }
            "bfi" => {
                only(&[])?;
                let ty = one_type(&types)?;
                let wide = match ty {
                    Ty::B32 => false,
                    Ty::B64 => true,
                    _ => return unsupported(),
                };
                let [d, a, b, c, e] = Self::ops::<5>(pi)?;
                let dd = self.dst(d, line)?;
                let sa = self.src(a, ty, line)?;
                let sb = self.src(b, ty, line)?;
                let sc = self.src(c, Ty::B32, line)?;
                let se = self.src(e, Ty::B32, line)?;
                Op::Bfi {
                    wide,
                    d: dd,
                    a: sa,
                    b: sb,
                    pos: sc,
                    len: se,
                }
            }
            "setp" => {
                let ty = one_type(&types)?;
                let mut cmp = None;
                let mut bop = None;
                for f in &flags {
                    let c = match *f {
                        "eq" => Cmp::Eq,
                        "ne" => Cmp::Ne,
                        "lt" | "lo" => Cmp::Lt,
                        "le" | "ls" => Cmp::Le,
                        "gt" | "hi" => Cmp::Gt,
                        "ge" | "hs" => Cmp::Ge,
                        "equ" => Cmp::Equ,
                        "neu" => Cmp::Neu,
                        "ltu" => Cmp::Ltu,
                        "leu" => Cmp::Leu,
                        "gtu" => Cmp::Gtu,
                        "geu" => Cmp::Geu,
                        "num" => Cmp::Num,
                        "nan" => Cmp::Nan,
                        "and" => {
                            bop = Some(BoolOp::And);
                            continue;
                        }
                        "or" => {
                            bop = Some(BoolOp::Or);
                            continue;
                        }
                        "xor" => {
                            bop = Some(BoolOp::Xor);
                            continue;
                        }
                        "ftz" => continue,
                        _ => return unsupported(),
                    };
                    if cmp.replace(c).is_some() {
                        return unsupported();
                    }
                }
                let Some(cmp) = cmp else { return unsupported() };
                let ct = match ty {
                    Ty::F32 => CT::F32,
                    Ty::F64 => CT::F64,
                    t => match t.int() {
                        Some(i) => CT::I(i),
                        None => return unsupported(),
                    },
                };
                if matches!(ct, CT::I(_))
                    && !matches!(
                        cmp,
                        Cmp::Eq | Cmp::Ne | Cmp::Lt | Cmp::Le | Cmp::Gt | Cmp::Ge
                    )
                {
                    return unsupported();
                }
                if matches!(ct, CT::I(i) if i.bits() < 16) {
                    return unsupported();
                }
                // unsigned comparisons for .b types and lo/ls/hi/hs are the type's own
                let (d, a, b, c) = match pi.ops.as_slice() {
                    [d, a, b] => (d, a, b, None),
                    [d, a, b, c] => (d, a, b, Some(c)),
                    _ => return err(line, format!("`{}`: 3 or 4 operands", pi.opcode)),
                };
                let (dd, dq) = match d {
                    POp::Pair(p, q) => {
                        let p = self.pred_dst(&POp::Name(p.clone()), line)?;
                        let q = self.pred_dst(&POp::Name(q.clone()), line)?;
                        (p, q)
                    }
                    _ => (self.pred_dst(d, line)?, NO_PRED),
                };
                let sa = self.src(a, ty, line)?;
                let sb = self.src(b, ty, line)?;
                let (bop, pc) = match (bop, c) {
                    (Some(o), Some(c)) => (o, self.pred(c, line)?),
                    (None, None) => (BoolOp::And, P_TRUE),
                    _ => return unsupported(),
                };
                if has("ftz") && ct != CT::F32 {
                    return unsupported();
                }
                Op::Setp {
                    cmp,
                    ty: ct,
                    ftz: has("ftz"),
                    bop,
                    d: dd,
                    dq,
                    a: sa,
                    b: sb,
                    c: pc,
                }
            }
            "selp" => {
                only(&[])?;
                let ty = one_type(&types)?;
                let [d, a, b, c] = Self::ops::<4>(pi)?;
                let dd = self.dst(d, line)?;
                let sa = self.src(a, ty, line)?;
                let sb = self.src(b, ty, line)?;
                let pc = self.pred(c, line)?;
                Op::Selp {
                    d: dd,
                    a: sa,
                    b: sb,
                    c: pc,
                }
            }
            "cvt" => self.cvt(pi, &types, rnd, irnd, &flags)?,
            "cvta" => {
                only(&["to", "global", "shared", "local", "const"])?;
                let ty = one_type(&types)?;
                if !matches!(ty, Ty::I(IT::U64) | Ty::I(IT::U32)) {
                    return unsupported();
                }
                let sp = if has("global") || has("const") {
                    MS::Global
                } else if has("shared") {
                    MS::Shared
                } else if has("local") {
                    MS::Local
                } else {
                    return unsupported();
                };
                let [d, a] = Self::ops::<2>(pi)?;
                let dd = self.dst(d, line)?;
                let sa = self.src(a, ty, line)?;
                Op::Cvta {
                    to: has("to"),
                    sp,
                    d: dd,
                    a: sa,
                }
            }
            "ld" | "st" => {
                let mut sp = None;
                let mut n = 1u8;
                for f in &flags {
                    match *f {
                        "global" => sp = Some(Space::Global),
                        "shared" => sp = Some(Space::Shared),
                        "local" => sp = Some(Space::Local),
                        "param" => sp = Some(Space::Param),
                        "const" => sp = Some(Space::Const),
                        "v2" => n = 2,
                        "v4" => n = 4,
                        "nc" if base == "ld" => {}
                        "ca" | "cg" | "cs" | "lu" | "cv" | "wb" | "wt" | "weak" => {}
                        _ => return unsupported(),
                    }
                }
                let ty = one_type(&types)?;
                if ty == Ty::Pred {
                    return unsupported();
                }
                let size = ty.bytes();
                let sext = matches!(ty, Ty::I(t) if t.signed());
                let (vop, aop) = if base == "ld" {
                    let [d, a] = Self::ops::<2>(pi)?;
                    (d, a)
                } else {
                    let [a, s] = Self::ops::<2>(pi)?;
                    (s, a)
                };
                let (ms, b, off) = self.addr(aop, sp, line)?;
                let items: Vec<POp> = match vop {
                    POp::Vec(v) => v.clone(),
                    o => vec![o.clone()],
                };
                if items.len() != n as usize {
                    return err(
                        line,
                        format!("`{}`: {} values for a .v{n}", pi.opcode, items.len()),
                    );
                }
                if ms == MS::KParam && base == "st" {
                    return err(line, "stores to kernel parameters are not supported");
                }
                let mut regs = [ZERO; 4];
                for (k, o) in items.iter().enumerate() {
                    regs[k] = if base == "ld" {
                        self.dst(o, line)?
                    } else {
                        self.src(o, ty, line)?
                    };
                }
                if base == "ld" {
                    Op::Ld {
                        sp: ms,
                        size,
                        sext,
                        n,
                        d: regs,
                        base: b,
                        off,
                    }
                } else {
                    Op::St {
                        sp: ms,
                        size,
                        n,
                        s: regs,
                        base: b,
                        off,
                    }
                }
            }
            "atom" => {
                let mut sp = Space::Global;
                let mut aop = None;
                for f in &flags {
                    let o = match *f {
                        "global" => {
                            sp = Space::Global;
                            continue;
                        }
                        "shared" => {
                            sp = Space::Shared;
                            continue;
                        }
                        "relaxed" | "gpu" | "cta" | "sys" => continue,
                        "add" => AOp::Add,
                        "min" => AOp::Min,
                        "max" => AOp::Max,
                        "exch" => AOp::Exch,
                        "cas" => AOp::Cas,
                        "and" => AOp::And,
                        "or" => AOp::Or,
                        "xor" => AOp::Xor,
                        "inc" => AOp::Inc,
                        "dec" => AOp::Dec,
                        _ => return unsupported(),
                    };
                    if aop.replace(o).is_some() {
                        return unsupported();
                    }
                }
                let Some(aop) = aop else { return unsupported() };
                let ty = one_type(&types)?;
                let at = match ty {
                    Ty::I(IT::U32) | Ty::B32 => AT::U32,
                    Ty::I(IT::S32) => AT::S32,
                    Ty::I(IT::U64) | Ty::B64 => AT::U64,
                    Ty::I(IT::S64) => AT::S64,
                    Ty::F32 => AT::F32,
                    Ty::F64 => AT::F64,
                    _ => return unsupported(),
                };
                let float = matches!(at, AT::F32 | AT::F64);
                let ok = match aop {
                    AOp::Add | AOp::Exch => true,
                    AOp::Cas | AOp::And | AOp::Or | AOp::Xor => !float,
                    AOp::Min | AOp::Max => !float,
                    AOp::Inc | AOp::Dec => at == AT::U32,
                };
                if !ok {
                    return unsupported();
                }
                let (d, a, b, c) = match pi.ops.as_slice() {
                    [d, a, b] if aop != AOp::Cas => (d, a, b, None),
                    [d, a, b, c] if aop == AOp::Cas => (d, a, b, Some(c)),
                    _ => return err(line, format!("`{}`: wrong operand count", pi.opcode)),
                };
                let dd = self.dst(d, line)?;
                let (ms, base, off) = self.addr(a, Some(sp), line)?;
                let sb = self.src(b, ty, line)?;
                let sc = match c {
                    Some(c) => self.src(c, ty, line)?,
                    None => ZERO,
                };
                Op::Atom {
                    sp: ms,
                    op: aop,
                    ty: at,
                    d: dd,
                    b: sb,
                    c: sc,
                    base,
                    off,
                }
            }
            "bra" => {
                only(&["uni"])?;
                let [t] = Self::ops::<1>(pi)?;
                let POp::Name(l) = t else {
                    return err(line, "bra: expected a label");
                };
                bra_fixups.push((self.p.code.len(), l.clone(), line));
                Op::Bra { target: 0 }
            }
            "call" => {
                only(&["uni"])?;
                let mut callee = None;
                for op in &pi.ops {
                    if let POp::Name(n) = op {
                        callee = Some(n.clone());
                    }
                }
                let Some(c) = callee else {
                    return err(line, "call: no target");
                };
                if self.lookup(&c).is_some() {
                    return err(line, "indirect calls are not supported");
                }
                let Some(lay) = self.layouts.get(&c) else {
                    return err(line, format!("call to unknown function `{c}`"));
                };
                let slot = lay.slot;
                self.call_fixups.push((self.p.code.len(), c, line));
                Op::Call { target: 0, slot }
            }
            "ret" => {
                only(&["uni"])?;
                // the slot is filled in when the function is finished
                Op::Ret { slot: u16::MAX - 1 }
            }
            "exit" => {
                only(&[])?;
                Op::Exit
            }
            "trap" => {
                only(&[])?;
                Op::Trap
            }
            "bar" | "barrier" => {
                // bar.sync a | barrier.sync a | bar.red.or.pred p, a, {!}c | bar.warp.sync m
                if has("warp") {
                    only(&["warp", "sync"])?;
                    if base != "bar" || !has("sync") || !types.is_empty() {
                        return unsupported();
                    }
                    let [m] = Self::ops::<1>(pi)?;
                    let mask = self.src(m, Ty::B32, line)?;
                    return Ok(Op::WarpSync { mask });
                }
                let is_red = has("red");
                if is_red {
                    only(&["red", "or", "aligned"])?;
                    if !has("or") || types != [Ty::Pred] {
                        return unsupported();
                    }
                    let [d, a, c] = Self::ops::<3>(pi)?;
                    let id = match a {
                        POp::Int(v) if (0..16).contains(v) => *v as u8,
                        _ => return err(line, "bar.red: the barrier must be an immediate 0..15"),
                    };
                    let dd = self.pred_dst(d, line)?;
                    let pc = self.pred(c, line)?;
                    Op::Bar {
                        id,
                        red: Some((dd, pc)),
                    }
                } else {
                    only(&["sync", "aligned"])?;
                    if !has("sync") || !types.is_empty() {
                        return unsupported();
                    }
                    let id = match pi.ops.as_slice() {
                        [POp::Int(v)] if (0..16).contains(v) => *v as u8,
                        [_, _] => {
                            return err(
                                line,
                                "unsupported instruction: bar.sync with a thread count",
                            )
                        }
                        _ => return err(line, "bar.sync: the barrier must be an immediate 0..15"),
                    };
                    Op::Bar { id, red: None }
                }
            }
            "shfl" => {
                only(&["sync", "up", "down", "bfly", "idx"])?;
                if !has("sync") || types != [Ty::B32] {
                    return unsupported();
                }
                let mode = if has("up") {
                    ShflMode::Up
                } else if has("down") {
                    ShflMode::Down
                } else if has("bfly") {
                    ShflMode::Bfly
                } else if has("idx") {
                    ShflMode::Idx
                } else {
                    return unsupported();
                };
                let [d, a, b, c, m] = Self::ops::<5>(pi)?;
                let (dd, p) = match d {
                    POp::Pair(x, q) => (
                        self.reg(x, line)?,
                        self.pred_dst(&POp::Name(q.clone()), line)?,
                    ),
                    _ => (self.dst(d, line)?, NO_PRED),
                };
                let sa = self.src(a, Ty::B32, line)?;
                let sb = self.src(b, Ty::B32, line)?;
                let sc = self.src(c, Ty::B32, line)?;
                let sm = self.src(m, Ty::B32, line)?;
                Op::Shfl {
                    mode,
                    d: dd,
                    p,
                    a: sa,
                    b: sb,
                    c: sc,
                    mask: sm,
                }
            }
            "mma" => {
                if pi.opcode != "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" {
                    return unsupported();
                }
                let [d, a, b, c] = Self::ops::<4>(pi)?;
                let mut regs = [ZERO; 14];
                let groups: [(&POp, usize, usize, Ty); 4] = [
                    (d, 0, 4, Ty::F32),
                    (a, 4, 4, Ty::B32),
                    (b, 8, 2, Ty::B32),
                    (c, 10, 4, Ty::F32),
                ];
                for (k, (op, at, cnt, ty)) in groups.into_iter().enumerate() {
                    let POp::Vec(v) = op else {
                        return err(line, "mma: operands are vectors `{...}`");
                    };
                    if v.len() != cnt {
                        return err(line, format!("mma: operand {k} needs {cnt} registers"));
                    }
                    for (j, o) in v.iter().enumerate() {
                        regs[at + j] = if k == 0 {
                            self.dst(o, line)?
                        } else {
                            self.src(o, ty, line)?
                        };
                    }
                }
                self.p.mmas.push(regs);
                Op::Mma {
                    i: (self.p.mmas.len() - 1) as u32,
                }
            }
            "ldmatrix" => {
                let mut n = 0u8;
                for f in &flags {
                    match *f {
                        "sync" | "aligned" | "m8n8" | "shared" | "trans" => {}
                        "x1" => n = 1,
                        "x2" => n = 2,
                        "x4" => n = 4,
                        _ => return unsupported(),
                    }
                }
                if n == 0 || !has("sync") || !has("aligned") || !has("m8n8") {
                    return unsupported();
                }
                if !(types.is_empty() || types == [Ty::B16]) {
                    return unsupported();
                }
                let [d, a] = Self::ops::<2>(pi)?;
                let POp::Vec(v) = d else {
                    return err(line, "ldmatrix: the destination is a vector `{...}`");
                };
                if v.len() != n as usize {
                    return err(line, format!("ldmatrix: .x{n} needs {n} registers"));
                }
                let mut regs = [ZERO; 4];
                for (k, o) in v.iter().enumerate() {
                    regs[k] = self.dst(o, line)?;
                }
                let (ms, base, off) = self.addr(a, Some(Space::Shared), line)?;
                if ms != MS::Shared {
                    return unsupported();
                }
                Op::Ldmatrix {
                    trans: has("trans"),
                    n,
                    d: regs,
                    base,
                    off,
                }
            }
            "cp" => {
                if mods.first() != Some(&"async") {
                    return unsupported();
                }
                match &mods[1..] {
                    ["commit_group"] => {
                        Self::ops::<0>(pi)?;
                        Op::CpCommit
                    }
                    ["wait_group"] => {
                        let [n] = Self::ops::<1>(pi)?;
                        let POp::Int(n) = n else {
                            return err(line, "cp.async.wait_group: expected an integer");
                        };
                        Op::CpWait { n: *n as u32 }
                    }
                    ["wait_all"] => {
                        Self::ops::<0>(pi)?;
                        Op::CpWait { n: 0 }
                    }
                    [cache, "shared", "global"] if *cache == "ca" || *cache == "cg" => {
                        let (d, s, sz, ssz) = match pi.ops.as_slice() {
                            [d, s, sz] => (d, s, sz, None),
                            [d, s, sz, ssz] => (d, s, sz, Some(ssz)),
                            _ => return err(line, "cp.async: 3 or 4 operands"),
                        };
                        let size = match sz {
                            POp::Int(v) if [4, 8, 16].contains(v) => *v as u8,
                            _ => return err(line, "cp.async: cp-size must be 4, 8 or 16"),
                        };
                        if *cache == "cg" && size != 16 {
                            return err(line, "cp.async.cg: cp-size must be 16");
                        }
                        let (dms, dbase, doff) = self.addr(d, Some(Space::Shared), line)?;
                        let (sms, sbase, soff) = self.addr(s, Some(Space::Global), line)?;
                        if dms != MS::Shared || sms != MS::Global {
                            return unsupported();
                        }
                        let src_size = match ssz {
                            Some(o) => self.src(o, Ty::B32, line)?,
                            None => self.konst(size as u64),
                        };
                        Op::CpAsync {
                            size,
                            dbase,
                            doff,
                            sbase,
                            soff,
                            src_size,
                        }
                    }
                    _ => return unsupported(),
                }
            }
            "membar" | "fence" => {
                only(&["gl", "cta", "sys", "sc", "acq_rel", "gpu"])?;
                Op::Nop
            }
            _ => return unsupported(),
        })
    }

    fn cvt(
        &mut self,
        pi: &PInst,
        types: &[Ty],
        rnd: Option<Rnd>,
        irnd: Option<IRnd>,
        flags: &[&str],
    ) -> Result<Op, LoadError> {
        let line = pi.line;
        let unsupported = || {
            err::<Op>(
                line,
                format!(
                    "unsupported instruction `{}` (gpu-sim does not implement it)",
                    pi.opcode
                ),
            )
        };
        for f in flags {
            if !["ftz", "sat", "relu", "satfinite"].contains(f) {
                return unsupported();
            }
        }
        let has = |f: &str| flags.contains(&f);
        let [dt, at] = types else {
            return unsupported();
        };
        let (dt, at) = (*dt, *at);
        if dt == Ty::Bf16x2 || dt == Ty::F16x2 {
            if at != Ty::F32 || rnd != Some(Rnd::Rn) || has("ftz") || has("sat") || has("satfinite")
            {
                return unsupported();
            }
            let [d, a, b] = Self::ops::<3>(pi)?;
            let dd = self.dst(d, line)?;
            let sa = self.src(a, Ty::F32, line)?;
            let sb = self.src(b, Ty::F32, line)?;
            return Ok(Op::CvtX2 {
                bf16: dt == Ty::Bf16x2,
                relu: has("relu"),
                d: dd,
                a: sa,
                b: sb,
            });
        }
        let [d, a] = Self::ops::<2>(pi)?;
        let (ftz, sat) = (has("ftz"), has("sat"));
        if (has("relu") || has("satfinite")) && !matches!(dt, Ty::Bf16 | Ty::F16) {
            return unsupported();
        }
        let k = match (dt.int(), at.int()) {
            (Some(to), Some(from)) => {
                if rnd.is_some() || irnd.is_some() || ftz {
                    return unsupported();
                }
                Cvt::II { from, to, sat }
            }
            (Some(to), None) => {
                let Some(ir) = irnd else { return unsupported() };
                if rnd.is_some() || sat {
                    return unsupported();
                }
                match at {
                    Ty::F32 => Cvt::F32ToI { to, irnd: ir, ftz },
                    Ty::F64 if !ftz => Cvt::F64ToI { to, irnd: ir },
                    _ => return unsupported(),
                }
            }
            (None, Some(from)) => {
                if rnd != Some(Rnd::Rn) || irnd.is_some() || ftz {
                    return unsupported();
                }
                match dt {
                    Ty::F32 => Cvt::IToF32 { from, sat },
                    Ty::F64 if !sat => Cvt::IToF64 { from },
                    _ => return unsupported(),
                }
            }
            (None, None) => match (dt, at) {
                (Ty::F64, Ty::F32) if rnd.is_none() && irnd.is_none() && !sat => {
                    Cvt::F32ToF64 { ftz }
                }
                (Ty::F32, Ty::F64) if irnd.is_none() => match rnd {
                    Some(r) if r == Rnd::Rn || !sat => Cvt::F64ToF32 { rnd: r, ftz, sat },
                    _ => return unsupported(),
                },
                (Ty::F32, Ty::F32) if rnd.is_none() => Cvt::F32ToF32 { irnd, ftz, sat },
                (Ty::F64, Ty::F64) if rnd.is_none() && !ftz => Cvt::F64ToF64 { irnd, sat },
                (Ty::Bf16, Ty::F32) if rnd == Some(Rnd::Rn) && !ftz && !sat => Cvt::F32ToBf16 {
                    relu: has("relu"),
                    satfinite: has("satfinite"),
                },
                (Ty::F16, Ty::F32) if rnd == Some(Rnd::Rn) && !ftz && !sat => Cvt::F32ToF16 {
                    relu: has("relu"),
                    satfinite: has("satfinite"),
                },
                (Ty::F32, Ty::Bf16) if rnd.is_none() && irnd.is_none() && !ftz && !sat => {
                    Cvt::Bf16ToF32
                }
                (Ty::F32, Ty::F16) if rnd.is_none() && irnd.is_none() && !sat => {
                    Cvt::F16ToF32 { ftz }
                }
                _ => return unsupported(),
            },
        };
        let _ = dt.is_float();
        let dd = self.dst(d, line)?;
        let sa = self.src(a, at, line)?;
        Ok(Op::Cvt { k, d: dd, a: sa })
    }
}
