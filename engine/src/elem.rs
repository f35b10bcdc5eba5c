//! Element types that device buffers hold.

use half::{bf16, f16};

/// A plain-old-data element a device buffer can hold.
pub trait Elem: bytemuck::Pod + Default + Send + Sync + std::fmt::Debug + 'static {
    const NAME: &'static str;
}

/// A floating-point element: activations and weights are stored in one of these.
pub trait Float: Elem + PartialOrd {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
}
impl Elem for i32 {
    const NAME: &'static str = "i32";
}
impl Elem for u32 {
    const NAME: &'static str = "u32";
}
impl Elem for u16 {
    const NAME: &'static str = "u16";
}
impl Elem for bf16 {
    const NAME: &'static str = "bf16";
}
impl Elem for f16 {
    const NAME: &'static str = "f16";
}

impl Float for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
impl Float for bf16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}
impl Float for f16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
