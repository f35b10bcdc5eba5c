//! Decoded instructions: every operand resolved to a register index, a constant or an offset,
//! so execution does no string handling.

/// A register file, or the kernel's constant table (immediates and symbol addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Cls {
    R16,
    R32,
    R64,
    K,
}

/// A register (or constant) operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rg {
    pub cls: Cls,
    pub idx: u16,
}

/// The constant 0 (always entry 0 of the constant table).
pub const ZERO: Rg = Rg {
    cls: Cls::K,
    idx: 0,
};

/// A predicate operand, possibly negated. Index 0 is constant false, 1 constant true.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pr {
    pub idx: u16,
    pub neg: bool,
}

pub const P_TRUE: Pr = Pr { idx: 1, neg: false };
/// No predicate destination.
pub const NO_PRED: u16 = u16::MAX;

/// Integer types of ALU instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IT {
    U8,
    S8,
    U16,
    S16,
    U32,
    S32,
    U64,
    S64,
}

impl IT {
    pub fn bits(self) -> u32 {
        match self {
            IT::U8 | IT::S8 => 8,
            IT::U16 | IT::S16 => 16,
            IT::U32 | IT::S32 => 32,
            IT::U64 | IT::S64 => 64,
        }
    }
    pub fn signed(self) -> bool {
        matches!(self, IT::S8 | IT::S16 | IT::S32 | IT::S64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IOp {
    Add,
    Sub,
    MulLo,
    MulHi,
    And,
    Or,
    Xor,
    Shl,
    Shr,
    Min,
    Max,
    Div,
    Rem,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IUn {
    Neg,
    Not,
    Abs,
    Popc,
    Clz,
    Brev,
}

/// IEEE rounding of a floating-point result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rnd {
    Rn,
    Rz,
    Rm,
    Rp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FOp {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FUn {
    Neg,
    Abs,
    Sqrt,
    Rcp,
    Ex2Approx,
    RcpApprox,
    SqrtApprox,
    RsqrtApprox,
    Lg2Approx,
    SinApprox,
    CosApprox,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

/// Operand type of setp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CT {
    I(IT),
    F32,
    F64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoolOp {
    And,
    Or,
    Xor,
}

/// Float-to-integer (or float-to-integral-float) rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IRnd {
    Rni,
    Rzi,
    Rmi,
    Rpi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cvt {
    /// Integer to integer (`sat`: clamp to the destination range).
    II {
        from: IT,
        to: IT,
        sat: bool,
    },
    F32ToF64 {
        ftz: bool,
    },
    F64ToF32 {
        rnd: Rnd,
        ftz: bool,
        sat: bool,
    },
    /// f32 to f32: `.sat` clamping, `.ftz`, or rounding to an integral value.
    F32ToF32 {
        irnd: Option<IRnd>,
        ftz: bool,
        sat: bool,
    },
    F64ToF64 {
        irnd: Option<IRnd>,
        sat: bool,
    },
    IToF32 {
        from: IT,
        sat: bool,
    },
    IToF64 {
        from: IT,
    },
    F32ToI {
        to: IT,
        irnd: IRnd,
        ftz: bool,
    },
    F64ToI {
        to: IT,
        irnd: IRnd,
    },
    F32ToBf16 {
        relu: bool,
        satfinite: bool,
    },
    F32ToF16 {
        relu: bool,
        satfinite: bool,
    },
    Bf16ToF32,
    F16ToF32 {
        ftz: bool,
    },
}

/// Memory spaces of the decoded loads and stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MS {
    Global,
    Shared,
    Local,
    /// The kernel's parameter buffer.
    KParam,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AOp {
    Add,
    Min,
    Max,
    Exch,
    Cas,
    And,
    Or,
    Xor,
    Inc,
    Dec,
}

/// Atom operand type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AT {
    U32,
    S32,
    U64,
    S64,
    F32,
    F64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Debug)]
pub enum Op {
    Mov {
        d: Rg,
        a: Rg,
    },
    /// `mov.bN d, {a, b, ...}`: parts from the least significant up.
    Pack {
        d: Rg,
        parts: [Rg; 4],
        n: u8,
        bits: u8,
    },
    /// `mov.bN {a, b, ...}, s`.
    Unpack {
        s: Rg,
        parts: [Rg; 4],
        n: u8,
        bits: u8,
    },
    Int {
        op: IOp,
        ty: IT,
        d: Rg,
        a: Rg,
        b: Rg,
    },
    IntUn {
        op: IUn,
        ty: IT,
        d: Rg,
        a: Rg,
    },
    /// mad.lo / mad.hi: d = lo/hi(a·b) + c.
    Mad {
        hi: bool,
        ty: IT,
        d: Rg,
        a: Rg,
        b: Rg,
        c: Rg,
    },
    /// mul.wide / mad.wide (c = ZERO for mul): d (2N bits) = a·b + c.
    Wide {
        ty: IT,
        d: Rg,
        a: Rg,
        b: Rg,
        c: Rg,
    },
    Bfi {
        wide: bool,
        d: Rg,
        a: Rg,
        b: Rg,
        pos: Rg,
        len: Rg,
    },
    F32 {
        op: FOp,
        rnd: Rnd,
        ftz: bool,
        sat: bool,
        d: Rg,
        a: Rg,
        b: Rg,
    },
    Fma32 {
        rnd: Rnd,
        ftz: bool,
        sat: bool,
        d: Rg,
        a: Rg,
        b: Rg,
        c: Rg,
    },
    F32Un {
        op: FUn,
        ftz: bool,
        sat: bool,
        d: Rg,
        a: Rg,
    },
    F64 {
        op: FOp,
        d: Rg,
        a: Rg,
        b: Rg,
    },
    Fma64 {
        d: Rg,
        a: Rg,
        b: Rg,
        c: Rg,
    },
    F64Un {
        op: FUn,
        ftz: bool,
        d: Rg,
        a: Rg,
    },
    Setp {
        cmp: Cmp,
        ty: CT,
        /// Subnormal f32 operands compare as zero.
        ftz: bool,
        bop: BoolOp,
        d: u16,
        dq: u16,
        a: Rg,
        b: Rg,
        c: Pr,
    },
    Selp {
        d: Rg,
        a: Rg,
        b: Rg,
        c: Pr,
    },
    /// Predicate logic: d = a op b (`Xor` with b = false for mov, a negated for not).
    PLogic {
        op: BoolOp,
        d: u16,
        a: Pr,
        b: Pr,
    },
    Cvt {
        k: Cvt,
        d: Rg,
        a: Rg,
    },
    /// cvt.rn.{bf16,f16}x2.f32 d, a, b: a in the upper half, b in the lower.
    CvtX2 {
        bf16: bool,
        relu: bool,
        d: Rg,
        a: Rg,
        b: Rg,
    },
    Ld {
        sp: MS,
        size: u8,
        sext: bool,
        n: u8,
        d: [Rg; 4],
        base: Rg,
        off: i64,
    },
    St {
        sp: MS,
        size: u8,
        n: u8,
        s: [Rg; 4],
        base: Rg,
        off: i64,
    },
    Atom {
        sp: MS,
        op: AOp,
        ty: AT,
        d: Rg,
        b: Rg,
        c: Rg,
        base: Rg,
        off: i64,
    },
    /// cvta (`to`: generic to `sp`); global is the identity.
    Cvta {
        to: bool,
        sp: MS,
        d: Rg,
        a: Rg,
    },
    Bra {
        target: u32,
    },
    Call {
        target: u32,
        slot: u16,
    },
    /// Return from the function owning `slot`; `slot` = u16::MAX exits the thread.
    Ret {
        slot: u16,
    },
    Exit,
    Trap,
    /// bar.sync / bar.red.or.pred (`red`: destination and source predicate).
    Bar {
        id: u8,
        red: Option<(u16, Pr)>,
    },
    Shfl {
        mode: ShflMode,
        d: Rg,
        p: u16,
        a: Rg,
        b: Rg,
        c: Rg,
        mask: Rg,
    },
    /// bar.warp.sync: waits until every lane of the member mask is here.
    WarpSync {
        mask: Rg,
    },
    /// mma.sync m16n8k16 bf16: operands in `Program::mmas[i]` (d[4], a[4], b[2], c[4]).
    Mma {
        i: u32,
    },
    Ldmatrix {
        trans: bool,
        n: u8,
        d: [Rg; 4],
        base: Rg,
        off: i64,
    },
    CpAsync {
        size: u8,
        dbase: Rg,
        doff: i64,
        sbase: Rg,
        soff: i64,
        src_size: Rg,
    },
    CpCommit,
    CpWait {
        n: u32,
    },
    /// Instructions with no effect here (membar, fence, prefetch).
    Nop,
}

#[derive(Clone, Debug)]
pub struct Inst {
    pub op: Op,
    pub guard: Pr,
    /// PTX line (1-based).
    pub line: u32,
    /// Index into `Program::locs`, or u32::MAX.
    pub loc: u32,
}

/// Special registers a kernel reads, materialised per warp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Special {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    LaneId,
    WarpId,
    NWarpId,
    LaneMaskEq,
    LaneMaskLt,
    LaneMaskLe,
    LaneMaskGt,
    LaneMaskGe,
}
