//! Tokens to a module: variables, functions and their bodies as statements with textual
//! operands. Opcodes are checked later, when bodies are decoded ([`super::decode`]).

use super::lex::{Tok, Token};
use super::LoadError;

/// A state space of variables and memory instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Global,
    Const,
    Shared,
    Local,
    Param,
}

/// A variable declaration (`.global`, `.shared`, `.local`, `.param`, `.const`).
#[derive(Clone, Debug)]
pub struct VarDecl {
    pub space: Space,
    pub name: String,
    pub align: u64,
    /// Total bytes; `None` for an unsized array (`.extern .shared ... name[]`).
    pub size: Option<u64>,
    pub init: Option<Vec<u8>>,
    pub is_extern: bool,
    pub line: usize,
}

/// One operand as written.
#[derive(Clone, Debug, PartialEq)]
pub enum POp {
    /// A register or a symbol (variable, label, function).
    Name(String),
    /// `!name` (a negated predicate).
    Not(String),
    Int(i128),
    F32(u32),
    F64(u64),
    Dec(f64),
    /// `[base + offset]`: base a register or symbol (or none).
    Addr(Option<String>, i64),
    /// `{a, b, ...}`.
    Vec(Vec<POp>),
    /// `(a, b, ...)` (call arguments / return values).
    List(Vec<String>),
    /// `d|p` (shfl's value and predicate destinations).
    Pair(String, String),
}

#[derive(Clone, Debug)]
pub struct PInst {
    pub line: usize,
    /// Index into the module's `.loc` table, or `u32::MAX`.
    pub loc: u32,
    pub guard: Option<(String, bool)>,
    pub opcode: String,
    pub ops: Vec<POp>,
}

#[derive(Clone, Debug)]
pub enum Item {
    Open,
    Close,
    /// Register declarations: type and names.
    Reg(String, Vec<String>, usize),
    /// A `.local`, `.shared` or `.param` variable declared in the body.
    Var(VarDecl),
    Label(String),
    Inst(PInst),
}

#[derive(Clone, Debug)]
pub struct Func {
    pub name: String,
    pub is_entry: bool,
    pub params: Vec<VarDecl>,
    pub rets: Vec<VarDecl>,
    pub body: Option<Vec<Item>>,
    pub maxntid: Option<[u32; 3]>,
    pub reqntid: Option<[u32; 3]>,
    pub line: usize,
}

#[derive(Clone, Debug, Default)]
pub struct ParsedModule {
    pub vars: Vec<VarDecl>,
    pub funcs: Vec<Func>,
    /// `.file` index to path.
    pub files: Vec<(u32, String)>,
    /// Distinct (file index, line) pairs that `.loc` directives name.
    pub locs: Vec<(u32, u32)>,
}

struct P<'a> {
    t: &'a [Token],
    i: usize,
    locs: Vec<(u32, u32)>,
    loc_index: std::collections::HashMap<(u32, u32), u32>,
    cur_loc: u32,
}

fn err<T>(line: usize, m: impl Into<String>) -> Result<T, LoadError> {
    Err(LoadError {
        line,
        message: m.into(),
    })
}

impl<'a> P<'a> {
    fn peek(&self) -> Option<&'a Tok> {
        self.t.get(self.i).map(|t| &t.tok)
    }
    fn line(&self) -> usize {
        self.t
            .get(self.i)
            .or_else(|| self.t.last())
            .map_or(0, |t| t.line)
    }
    fn next(&mut self) -> Result<&'a Tok, LoadError> {
        let t = self.t.get(self.i).map(|t| &t.tok);
        match t {
            Some(t) => {
                self.i += 1;
                Ok(t)
            }
            None => err(self.line(), "unexpected end of the PTX text"),
        }
    }
    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }
    fn eat_punct(&mut self, c: char) -> bool {
        if self.is_punct(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect_punct(&mut self, c: char) -> Result<(), LoadError> {
        if self.eat_punct(c) {
            Ok(())
        } else {
            err(
                self.line(),
                format!("expected `{c}`, found {}", self.describe()),
            )
        }
    }
    fn describe(&self) -> String {
        match self.peek() {
            Some(Tok::Ident(s)) => format!("`{s}`"),
            Some(Tok::Punct(c)) => format!("`{c}`"),
            Some(Tok::Int(v)) => format!("`{v}`"),
            Some(t) => format!("{t:?}"),
            None => "the end of the text".into(),
        }
    }
    fn ident(&mut self) -> Result<&'a str, LoadError> {
        let line = self.line();
        match self.next()? {
            Tok::Ident(s) => Ok(s),
            t => err(line, format!("expected a name, found {t:?}")),
        }
    }
    fn int(&mut self) -> Result<u64, LoadError> {
        let line = self.line();
        match self.next()? {
            Tok::Int(v) => Ok(*v),
            t => err(line, format!("expected an integer, found {t:?}")),
        }
    }
    fn peek_ident(&self) -> Option<&'a str> {
        match self.peek() {
            Some(Tok::Ident(s)) => Some(s),
            _ => None,
        }
    }
    /// Skips the rest of the current line (directives without `;`).
    fn skip_line(&mut self, line: usize) {
        while self.i < self.t.len() && self.t[self.i].line == line {
            self.i += 1;
        }
    }
    fn skip_to_semicolon(&mut self) -> Result<(), LoadError> {
        while !self.eat_punct(';') {
            self.next()?;
        }
        Ok(())
    }
    /// Skips a balanced `{ ... }`.
    fn skip_block(&mut self) -> Result<(), LoadError> {
        self.expect_punct('{')?;
        let mut depth = 1;
        while depth > 0 {
            match self.next()? {
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => depth -= 1,
                _ => {}
            }
        }
        Ok(())
    }
    /// `n[, n[, n]]` on one line (`.maxntid`, `.reqntid`).
    fn dims(&mut self) -> Result<[u32; 3], LoadError> {
        let mut d = [1u32; 3];
        for (k, x) in d.iter_mut().enumerate() {
            if k > 0 && !self.eat_punct(',') {
                break;
            }
            *x = self.int()? as u32;
        }
        Ok(d)
    }
    fn loc(&mut self, line: usize) -> Result<(), LoadError> {
        // .loc file line col [, function_name ..., inlined_at ...]: the first location is the
        // innermost (the inlined callee's line), which is the one worth naming.
        let file = self.int()? as u32;
        let l = self.int()? as u32;
        self.skip_line(line);
        if l == 0 {
            // line 0: compiler-generated code with no source line
            self.cur_loc = u32::MAX;
            return Ok(());
        }
        let n = self.locs.len() as u32;
        let idx = *self.loc_index.entry((file, l)).or_insert(n);
        if idx == n {
            self.locs.push((file, l));
        }
        self.cur_loc = idx;
        Ok(())
    }
}

fn type_size(ty: &str) -> Option<u64> {
    Some(match ty {
        ".b8" | ".u8" | ".s8" | ".pred" => 1,
        ".b16" | ".u16" | ".s16" | ".f16" | ".bf16" => 2,
        ".b32" | ".u32" | ".s32" | ".f32" | ".f16x2" | ".bf16x2" => 4,
        ".b64" | ".u64" | ".s64" | ".f64" => 8,
        ".b128" => 16,
        _ => return None,
    })
}

pub fn parse(toks: &[Token]) -> Result<ParsedModule, LoadError> {
    let mut p = P {
        t: toks,
        i: 0,
        locs: Vec::new(),
        loc_index: Default::default(),
        cur_loc: u32::MAX,
    };
    let mut m = ParsedModule::default();
    while p.i < toks.len() {
        let line = p.line();
        let tok = p.next()?;
        let Tok::Ident(d) = tok else {
            return err(line, format!("unexpected {tok:?} at module scope"));
        };
        match d.as_str() {
            ".version" | ".target" | ".address_size" => p.skip_line(line),
            ".file" => {
                let n = p.int()? as u32;
                let path = match p.next()? {
                    Tok::Str(s) => s.clone(),
                    t => return err(line, format!(".file: expected a path, found {t:?}")),
                };
                p.skip_line(line);
                m.files.push((n, path));
            }
            ".section" => {
                p.ident()?;
                p.skip_block()?;
            }
            ".pragma" => p.skip_to_semicolon()?,
            ".visible" | ".weak" | ".extern" | ".common" => {
                // linkage: applies to the next declaration
                let is_extern = d == ".extern";
                match p.peek_ident() {
                    Some(".entry") | Some(".func") => {}
                    Some(".global") | Some(".shared") | Some(".const") => {
                        let sp = p.ident()?;
                        let v = var_decl(&mut p, sp, is_extern, line)?;
                        m.vars.push(v);
                    }
                    _ => return err(line, format!("`{d}` before {}", p.describe())),
                }
            }
            ".entry" | ".func" => {
                let f = func(&mut p, d == ".entry", line)?;
                if let Some(prev) = m.funcs.iter_mut().find(|g| g.name == f.name) {
                    if f.body.is_some() {
                        *prev = f;
                    }
                } else {
                    m.funcs.push(f);
                }
            }
            ".global" | ".shared" | ".const" => {
                let v = var_decl(&mut p, d, false, line)?;
                m.vars.push(v);
            }
            _ => return err(line, format!("unsupported module-scope directive `{d}`")),
        }
    }
    m.locs = p.locs;
    Ok(m)
}

/// After the state space: `[.align n] [.vN] .type name[[n]...] [= init];`
fn var_decl(p: &mut P, space: &str, is_extern: bool, line: usize) -> Result<VarDecl, LoadError> {
    let space = match space {
        ".global" => Space::Global,
        ".const" => Space::Const,
        ".shared" => Space::Shared,
        ".local" => Space::Local,
        ".param" => Space::Param,
        s => return err(line, format!("unsupported state space `{s}`")),
    };
    let mut align = 0;
    let mut vec = 1;
    let mut ty = String::new();
    let name;
    loop {
        let w = p.ident()?;
        match w {
            ".align" => align = p.int()?,
            ".v2" => vec = 2,
            ".v4" => vec = 4,
            ".ptr" | ".global" | ".shared" | ".const" | ".local" => {}
            _ if w.starts_with('.') => {
                if type_size(w).is_none() {
                    return err(line, format!("unsupported variable type `{w}`"));
                }
                ty = w.to_string();
            }
            _ => {
                name = w.to_string();
                break;
            }
        }
    }
    let Some(esize) = type_size(&ty) else {
        return err(line, format!("variable `{name}` has no type"));
    };
    let elem = esize * vec;
    let mut size = Some(elem);
    let mut count = 1u64;
    while p.eat_punct('[') {
        if p.eat_punct(']') {
            size = None;
            continue;
        }
        count *= p.int()?;
        p.expect_punct(']')?;
        size = size.map(|_| elem * count);
    }
    let mut init = None;
    if p.eat_punct('=') {
        let mut vals = Vec::new();
        init_list(p, &mut vals, line)?;
        let total = size.unwrap_or(elem * vals.len() as u64);
        let mut bytes = vec![0u8; total as usize];
        for (k, v) in vals.iter().enumerate() {
            let at = k * esize as usize;
            if at + esize as usize > bytes.len() {
                return err(line, format!("too many initialisers for `{name}`"));
            }
            let bits = match *v {
                Tok::Int(x) => x,
                Tok::F32(x) if ty == ".f64" => (f32::from_bits(x) as f64).to_bits(),
                Tok::F32(x) => x as u64,
                Tok::F64(x) if ty == ".f32" => (f64::from_bits(x) as f32).to_bits() as u64,
                Tok::F64(x) => x,
                Tok::Dec(x) if ty == ".f32" => (x as f32).to_bits() as u64,
                Tok::Dec(x) => x.to_bits(),
                _ => return err(line, format!("unsupported initialiser of `{name}`")),
            };
            bytes[at..at + esize as usize].copy_from_slice(&bits.to_le_bytes()[..esize as usize]);
        }
        size = Some(total);
        init = Some(bytes);
    }
    p.expect_punct(';')?;
    Ok(VarDecl {
        space,
        name,
        align: align.max(esize),
        size,
        init,
        is_extern,
        line,
    })
}

fn init_list(p: &mut P, out: &mut Vec<Tok>, line: usize) -> Result<(), LoadError> {
    if p.eat_punct('{') {
        loop {
            init_list(p, out, line)?;
            if p.eat_punct('}') {
                return Ok(());
            }
            p.expect_punct(',')?;
        }
    }
    let neg = p.eat_punct('-');
    let t = p.next()?.clone();
    let t = match (t, neg) {
        (t, false) => t,
        (Tok::Int(v), true) => Tok::Int(v.wrapping_neg()),
        (Tok::F32(v), true) => Tok::F32(v ^ 0x8000_0000),
        (Tok::F64(v), true) => Tok::F64(v ^ (1 << 63)),
        (Tok::Dec(v), true) => Tok::Dec(-v),
        (t, true) => return err(line, format!("bad initialiser -{t:?}")),
    };
    if !matches!(t, Tok::Int(_) | Tok::F32(_) | Tok::F64(_) | Tok::Dec(_)) {
        return err(
            line,
            format!("unsupported initialiser {t:?} (only numbers are supported)"),
        );
    }
    out.push(t);
    Ok(())
}

/// `( .param ..., .param ... )`
fn param_list(p: &mut P, line: usize) -> Result<Vec<VarDecl>, LoadError> {
    p.expect_punct('(')?;
    let mut v = Vec::new();
    if p.eat_punct(')') {
        return Ok(v);
    }
    loop {
        let l = p.line();
        let sp = p.ident()?;
        if sp != ".param" && sp != ".reg" {
            return err(l, format!("expected .param, found `{sp}`"));
        }
        if sp == ".reg" {
            return err(l, "register parameters of .func are not supported");
        }
        // var_decl expects a `;` at the end; parameters end with `,` or `)`.
        let mut align = 0;
        let mut ty = String::new();
        let name;
        loop {
            let w = p.ident()?;
            match w {
                ".align" => align = p.int()?,
                ".ptr" | ".global" | ".shared" | ".const" | ".local" => {}
                _ if w.starts_with('.') => {
                    if type_size(w).is_none() {
                        return err(l, format!("unsupported parameter type `{w}`"));
                    }
                    ty = w.to_string();
                }
                _ => {
                    name = w.to_string();
                    break;
                }
            }
        }
        let esize = type_size(&ty).unwrap_or(0);
        if esize == 0 {
            return err(l, format!("parameter `{name}` has no type"));
        }
        let mut count = 1;
        while p.eat_punct('[') {
            count *= p.int()?;
            p.expect_punct(']')?;
        }
        v.push(VarDecl {
            space: Space::Param,
            name,
            align: align.max(esize),
            size: Some(esize * count),
            init: None,
            is_extern: false,
            line: l,
        });
        if p.eat_punct(')') {
            return Ok(v);
        }
        if !p.eat_punct(',') {
            return err(line, format!("expected `,` or `)`, found {}", p.describe()));
        }
    }
}

fn func(p: &mut P, is_entry: bool, line: usize) -> Result<Func, LoadError> {
    let mut rets = Vec::new();
    if !is_entry && p.is_punct('(') {
        rets = param_list(p, line)?;
    }
    let name = p.ident()?.to_string();
    let params = if p.is_punct('(') {
        param_list(p, line)?
    } else {
        Vec::new()
    };
    let mut f = Func {
        name,
        is_entry,
        params,
        rets,
        body: None,
        maxntid: None,
        reqntid: None,
        line,
    };
    loop {
        let l = p.line();
        match p.peek() {
            Some(Tok::Punct(';')) => {
                p.i += 1;
                return Ok(f);
            }
            Some(Tok::Punct('{')) => break,
            Some(Tok::Ident(d)) => {
                p.i += 1;
                match d.as_str() {
                    ".maxntid" => f.maxntid = Some(p.dims()?),
                    ".reqntid" => f.reqntid = Some(p.dims()?),
                    ".minnctapersm" | ".maxnreg" | ".maxnctapersm" => p.skip_line(l),
                    ".noreturn" => {}
                    ".pragma" => p.skip_to_semicolon()?,
                    _ => return err(l, format!("unsupported function directive `{d}`")),
                }
            }
            _ => return err(l, format!("unexpected {} after `{}`", p.describe(), f.name)),
        }
    }
    p.expect_punct('{')?;
    p.cur_loc = u32::MAX;
    f.body = Some(body(p)?);
    Ok(f)
}

fn body(p: &mut P) -> Result<Vec<Item>, LoadError> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    loop {
        let line = p.line();
        match p.next()? {
            Tok::Punct('{') => {
                depth += 1;
                items.push(Item::Open);
            }
            Tok::Punct('}') => {
                if depth == 0 {
                    return Ok(items);
                }
                depth -= 1;
                items.push(Item::Close);
            }
            Tok::Punct('@') => {
                let neg = p.eat_punct('!');
                let g = p.ident()?.to_string();
                let mut inst = instruction(p)?;
                inst.guard = Some((g, neg));
                items.push(Item::Inst(inst));
            }
            Tok::Ident(s) if s.starts_with('.') => match s.as_str() {
                ".loc" => p.loc(line)?,
                ".pragma" => p.skip_to_semicolon()?,
                ".reg" => {
                    let ty = p.ident()?.to_string();
                    let mut names = Vec::new();
                    loop {
                        let n = p.ident()?.to_string();
                        if p.eat_punct('<') {
                            let k = p.int()?;
                            p.expect_punct('>')?;
                            for j in 0..k {
                                names.push(format!("{n}{j}"));
                            }
                        } else {
                            names.push(n);
                        }
                        if p.eat_punct(';') {
                            break;
                        }
                        p.expect_punct(',')?;
                    }
                    items.push(Item::Reg(ty, names, line));
                }
                ".local" | ".shared" | ".param" | ".global" | ".const" => {
                    let v = var_decl(p, s, false, line)?;
                    items.push(Item::Var(v));
                }
                _ => {
                    return err(
                        line,
                        format!("unsupported directive `{s}` in a function body"),
                    )
                }
            },
            Tok::Ident(s) => {
                if p.eat_punct(':') {
                    items.push(Item::Label(s.clone()));
                } else {
                    p.i -= 1;
                    let inst = instruction(p)?;
                    items.push(Item::Inst(inst));
                }
            }
            t => return err(line, format!("unexpected {t:?} in a function body")),
        }
    }
}

fn instruction(p: &mut P) -> Result<PInst, LoadError> {
    let line = p.line();
    let opcode = p.ident()?.to_string();
    let mut ops = Vec::new();
    if !p.eat_punct(';') {
        loop {
            ops.push(operand(p)?);
            if p.eat_punct(';') {
                break;
            }
            if !p.eat_punct(',') {
                return err(
                    p.line(),
                    format!("`{opcode}`: expected `,` or `;`, found {}", p.describe()),
                );
            }
        }
    }
    Ok(PInst {
        line,
        loc: p.cur_loc,
        guard: None,
        opcode,
        ops,
    })
}

fn signed_num(p: &mut P, neg: bool) -> Result<POp, LoadError> {
    let line = p.line();
    Ok(match (p.next()?, neg) {
        (Tok::Int(v), n) => POp::Int(if n { -(*v as i128) } else { *v as i128 }),
        (Tok::F32(v), n) => POp::F32(if n { v ^ 0x8000_0000 } else { *v }),
        (Tok::F64(v), n) => POp::F64(if n { v ^ (1 << 63) } else { *v }),
        (Tok::Dec(v), n) => POp::Dec(if n { -v } else { *v }),
        (t, _) => return err(line, format!("expected a number, found {t:?}")),
    })
}

fn operand(p: &mut P) -> Result<POp, LoadError> {
    let line = p.line();
    match p.peek() {
        Some(Tok::Punct('[')) => {
            p.i += 1;
            let mut base = None;
            let mut off: i64 = 0;
            let mut sign = 1i64;
            loop {
                match p.next()? {
                    Tok::Ident(s) if base.is_none() => base = Some(s.clone()),
                    Tok::Int(v) => off = off.wrapping_add(sign.wrapping_mul(*v as i64)),
                    Tok::Punct('+') => sign = 1,
                    Tok::Punct('-') => sign = -sign,
                    Tok::Punct(']') => break,
                    t => return err(line, format!("bad address term {t:?}")),
                }
            }
            Ok(POp::Addr(base, off))
        }
        Some(Tok::Punct('{')) => {
            p.i += 1;
            let mut v = Vec::new();
            loop {
                v.push(operand(p)?);
                if p.eat_punct('}') {
                    break;
                }
                p.expect_punct(',')?;
            }
            Ok(POp::Vec(v))
        }
        Some(Tok::Punct('(')) => {
            p.i += 1;
            let mut v = Vec::new();
            if p.eat_punct(')') {
                return Ok(POp::List(v));
            }
            loop {
                v.push(p.ident()?.to_string());
                if p.eat_punct(')') {
                    break;
                }
                p.expect_punct(',')?;
            }
            Ok(POp::List(v))
        }
        Some(Tok::Punct('!')) => {
            p.i += 1;
            Ok(POp::Not(p.ident()?.to_string()))
        }
        Some(Tok::Punct('-')) => {
            p.i += 1;
            signed_num(p, true)
        }
        Some(Tok::Ident(s)) => {
            p.i += 1;
            if p.eat_punct('|') {
                let q = p.ident()?.to_string();
                return Ok(POp::Pair(s.clone(), q));
            }
            Ok(POp::Name(s.clone()))
        }
        Some(_) => signed_num(p, false),
        None => err(line, "unexpected end of the PTX text"),
    }
}
