//! Device memory: [`DBuf`] owns an allocation, [`DRef`]/[`DMut`] borrow a range of it, so a
//! buffer cannot be freed while a view exists and a view knows its length for the op guards.

use crate::elem::Elem;
use cudarc::driver::CudaSlice;
use std::marker::PhantomData;

/// A device buffer of `len` elements of `T` (raw bytes underneath, so any [`Elem`] fits).
pub struct DBuf<T: Elem> {
    pub(super) mem: Option<CudaSlice<u8>>,
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) _t: PhantomData<T>,
}

impl<T: Elem> DBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The CUdeviceptr of the first element (0 for an empty buffer).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

/// A borrowed read-only view of `len` elements of a [`DBuf`].
pub struct DRef<'a, T> {
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) _t: PhantomData<&'a T>,
}
impl<T> Clone for DRef<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DRef<'_, T> {}

/// A borrowed mutable view of `len` elements of a [`DBuf`].
pub struct DMut<'a, T> {
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) _t: PhantomData<&'a mut T>,
}

impl<'a, T> DRef<'a, T> {
    /// The CUdeviceptr of the first element.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub(crate) fn sub(self, off: usize, len: usize) -> Self {
        assert!(
            off + len <= self.len,
            "view [{off}, {}) out of bounds of {}",
            off + len,
            self.len
        );
        DRef {
            ptr: self.ptr + (off * std::mem::size_of::<T>()) as u64,
            len,
            _t: PhantomData,
        }
    }
}

impl<'a, T> DMut<'a, T> {
    /// The CUdeviceptr of the first element.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// A mutable view of `[off, off + len)`, borrowing this one.
    pub fn sub_mut(&mut self, off: usize, len: usize) -> DMut<'_, T> {
        DMut {
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
        .into_sub(off, len)
    }
    /// The view narrowed to `[off, off + len)`, for as long as this one lived.
    fn into_sub(self, off: usize, len: usize) -> DMut<'a, T> {
        assert!(
            off + len <= self.len,
            "view [{off}, {}) out of bounds of {}",
            off + len,
            self.len
        );
        DMut {
            ptr: self.ptr + (off * std::mem::size_of::<T>()) as u64,
            len,
            _t: PhantomData,
        }
    }
    /// A read-only view of the same elements.
    pub fn as_ref(&self) -> DRef<'_, T> {
        DRef {
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
    }
}

impl<T: Elem> DBuf<T> {
    pub(crate) fn view(&self) -> DRef<'_, T> {
        DRef {
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
    }
    pub(crate) fn view_mut(&mut self) -> DMut<'_, T> {
        DMut {
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
    }
    pub(crate) fn slice(&self, off: usize, len: usize) -> DRef<'_, T> {
        self.view().sub(off, len)
    }
    pub(crate) fn slice_mut(&mut self, off: usize, len: usize) -> DMut<'_, T> {
        self.view_mut().into_sub(off, len)
    }
    /// Keeps the allocation reachable (it is freed on drop, in stream order).
    #[allow(dead_code)]
    pub(super) fn mem(&self) -> Option<&CudaSlice<u8>> {
        self.mem.as_ref()
    }
}
