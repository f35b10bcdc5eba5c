//! Device memory: allocations in host memory at addresses no host pointer has.
//!
//! Device `d` hands out addresses from `BASE + d * DEVICE_SPAN`, 256-aligned like cudaMalloc,
//! never reused, with an unmapped gap after every allocation: a kernel that steps past the end of
//! a buffer, or reads a freed one, lands in no allocation and fails memcheck instead of reading a
//! neighbour. A host pointer handed to a kernel is in no allocation either. Fresh memory is
//! filled with 0xFF bytes (NaN in f32, bf16 and f64: initcheck by poisoning), so a read of memory
//! nobody wrote shows up as NaN, not as a lucky zero.
//!
//! Kernels see memory through a [`MemView`], a snapshot of the live allocations taken at launch.
//! A view keeps every region it names alive (an `Arc`), so a free that runs while a view exists
//! cannot leave it pointing at released memory.

use std::alloc::Layout;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};

/// The first device address of device 0.
pub const BASE: u64 = 0x0000_3000_0000_0000;
/// Addresses per device (1 TiB): device `d`'s allocations lie in `[BASE + d * SPAN, + SPAN)`.
pub const DEVICE_SPAN: u64 = 1 << 40;
/// Allocation alignment (as cudaMalloc's).
pub const ALIGN: u64 = 256;
/// Unmapped bytes left after every allocation.
const RED_ZONE: u64 = 4096;
/// The byte fresh allocations are filled with: 0xFFFF.. is a NaN in every float format.
pub const FRESH: u8 = 0xFF;
/// How many freed ranges are remembered, to name use-after-free in error messages.
const FREED_KEPT: usize = 65536;

/// The host memory behind one allocation. Released when the last [`Arc`] goes.
pub struct RegionData {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the pointer is owned by this value and only dereferenced through it; kernels running
// on several threads write disjoint (or atomically accessed) bytes, as on a GPU.
unsafe impl Send for RegionData {}
unsafe impl Sync for RegionData {}

impl Drop for RegionData {
    fn drop(&mut self) {
        // SAFETY: allocated in `Memory::alloc` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// One live allocation.
#[derive(Clone)]
pub struct Region {
    pub base: u64,
    pub size: u64,
    data: Arc<RegionData>,
}

impl Region {
    /// The host address of device address `base`.
    pub fn host_ptr(&self) -> *mut u8 {
        self.data.ptr
    }
}

/// Why a device address range cannot be accessed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// In no allocation, live or freed (a host pointer, garbage, or far out of bounds).
    Unmapped { addr: u64, len: u64 },
    /// Starts inside an allocation and runs past its end.
    OutOfBounds {
        addr: u64,
        len: u64,
        base: u64,
        size: u64,
    },
    /// Inside (or just past) an allocation that has been freed.
    Freed {
        addr: u64,
        len: u64,
        base: u64,
        size: u64,
    },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Fault::Unmapped { addr, len } => write!(
                f,
                "{len} bytes at {addr:#x} are in no device allocation{}",
                if !(BASE..BASE + 64 * DEVICE_SPAN).contains(&addr) {
                    " (a host pointer or a small integer, not a device address)"
                } else {
                    ""
                }
            ),
            Fault::OutOfBounds {
                addr,
                len,
                base,
                size,
            } => {
                let end = addr + len;
                write!(
                    f,
                    "{len} bytes at {addr:#x} run {} bytes past the end of the {size}-byte \
                     allocation at {base:#x}",
                    end.saturating_sub(base + size)
                )
            }
            Fault::Freed {
                addr,
                len,
                base,
                size,
            } => write!(
                f,
                "{len} bytes at {addr:#x} are in the {size}-byte allocation at {base:#x}, which \
                 has been freed"
            ),
        }
    }
}

/// A snapshot of the live allocations, for a kernel launch or a library call.
pub struct MemView {
    /// (base, end, host pointer), sorted by base.
    spans: Vec<(u64, u64, *mut u8)>,
    /// Keeps the regions above alive.
    _keep: Vec<Arc<RegionData>>,
    /// Recently freed (base, size), for messages.
    freed: Vec<(u64, u64)>,
}

// SAFETY: the raw pointers are kept alive by `_keep`; see RegionData.
unsafe impl Send for MemView {}
unsafe impl Sync for MemView {}

impl MemView {
    /// The host address of the `len` bytes at device address `addr`, or why they cannot be
    /// accessed. `len` 0 is checked as 1 byte.
    #[inline]
    pub fn translate(&self, addr: u64, len: u64) -> Result<*mut u8, Fault> {
        let i = self.spans.partition_point(|s| s.0 <= addr);
        if i > 0 {
            let (base, end, ptr) = self.spans[i - 1];
            if addr < end {
                if addr.checked_add(len.max(1)).is_some_and(|e| e <= end) {
                    // SAFETY: in bounds of the region (checked above).
                    return Ok(unsafe { ptr.add((addr - base) as usize) });
                }
                return Err(Fault::OutOfBounds {
                    addr,
                    len,
                    base,
                    size: end - base,
                });
            }
        }
        Err(self.why(addr, len))
    }

    /// The live span `(base, end, host pointer)` that holds `addr`, if any (callers cache it to
    /// check a warp's accesses against one span).
    #[inline]
    pub fn span_of(&self, addr: u64) -> Option<(u64, u64, *mut u8)> {
        let i = self.spans.partition_point(|s| s.0 <= addr);
        (i > 0 && addr < self.spans[i - 1].1).then(|| self.spans[i - 1])
    }

    /// The fault for an address in no live allocation: freed (within a red zone of one) or
    /// unmapped.
    pub fn why(&self, addr: u64, len: u64) -> Fault {
        for &(base, size) in self.freed.iter().rev() {
            if addr >= base && addr < base + size + RED_ZONE {
                return Fault::Freed {
                    addr,
                    len,
                    base,
                    size,
                };
            }
        }
        // Just past a live allocation's end (in its red zone): out of bounds of it.
        let i = self.spans.partition_point(|s| s.0 <= addr);
        if i > 0 {
            let (base, end, _) = self.spans[i - 1];
            if addr < end + RED_ZONE {
                return Fault::OutOfBounds {
                    addr,
                    len,
                    base,
                    size: end - base,
                };
            }
        }
        Fault::Unmapped { addr, len }
    }
}

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocError {
    /// Over the modelled device memory.
    OutOfMemory {
        bytes: u64,
        used: u64,
        capacity: u64,
    },
    /// The host could not give the memory.
    Host { bytes: u64 },
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AllocError::OutOfMemory {
                bytes,
                used,
                capacity,
            } => write!(
                f,
                "allocating {bytes} bytes: {used} of the simulated GPU's {capacity} bytes are in use"
            ),
            AllocError::Host { bytes } => {
                write!(f, "allocating {bytes} bytes: the host has no memory for them")
            }
        }
    }
}

struct State {
    live: BTreeMap<u64, Region>,
    freed: VecDeque<(u64, u64)>,
    next: u64,
    used: u64,
    view: Option<Arc<MemView>>,
}

/// One simulated device's memory.
pub struct Memory {
    capacity: u64,
    state: Mutex<State>,
}

impl Memory {
    /// The memory of device `device`, `capacity` bytes modelled.
    pub fn new(device: u32, capacity: u64) -> Memory {
        Memory {
            capacity,
            state: Mutex::new(State {
                live: BTreeMap::new(),
                freed: VecDeque::new(),
                next: BASE + device as u64 * DEVICE_SPAN,
                used: 0,
                view: None,
            }),
        }
    }

    /// Modelled bytes in all.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes allocated and not freed.
    pub fn used(&self) -> u64 {
        self.state.lock().unwrap().used
    }

    /// A new allocation of `bytes` (> 0) filled with [`FRESH`]; its device address.
    pub fn alloc(&self, bytes: u64) -> Result<u64, AllocError> {
        let mut st = self.state.lock().unwrap();
        if st.used.saturating_add(bytes) > self.capacity {
            return Err(AllocError::OutOfMemory {
                bytes,
                used: st.used,
                capacity: self.capacity,
            });
        }
        let padded = bytes.max(1).next_multiple_of(ALIGN);
        let layout = usize::try_from(padded)
            .ok()
            .and_then(|p| Layout::from_size_align(p, ALIGN as usize).ok())
            .ok_or(AllocError::Host { bytes })?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(AllocError::Host { bytes });
        }
        // SAFETY: `ptr` holds `padded` bytes.
        unsafe { std::ptr::write_bytes(ptr, FRESH, padded as usize) };
        let base = st.next;
        st.next = base + padded + RED_ZONE;
        st.used += bytes;
        st.live.insert(
            base,
            Region {
                base,
                size: bytes,
                data: Arc::new(RegionData { ptr, layout }),
            },
        );
        st.view = None;
        Ok(base)
    }

    /// Frees the allocation starting at `addr`. Err(message) when `addr` is not the start of a
    /// live allocation (a double free, an interior pointer, a host pointer).
    pub fn free(&self, addr: u64) -> Result<(), String> {
        let mut st = self.state.lock().unwrap();
        let Some(r) = st.live.remove(&addr) else {
            return Err(format!(
                "freeing {addr:#x}: {}",
                Self::not_freeable(&mut st, addr)
            ));
        };
        st.used -= r.size;
        st.freed.push_back((r.base, r.size));
        if st.freed.len() > FREED_KEPT {
            st.freed.pop_front();
        }
        st.view = None;
        Ok(())
    }

    /// Why `addr` cannot be freed (for a caller that checks before queueing the free).
    pub fn free_check_message(&self, addr: u64) -> String {
        Self::not_freeable(&mut self.state.lock().unwrap(), addr)
    }

    fn not_freeable(st: &mut State, addr: u64) -> String {
        if let Some((base, r)) = st.live.range(..addr).next_back() {
            if addr < base + r.size {
                return format!(
                    "{} bytes into the {}-byte allocation at {base:#x}: only the start of an \
                     allocation can be freed",
                    addr - base,
                    r.size
                );
            }
        }
        match Self::view_of(st).why(addr, 1) {
            Fault::Freed { base, size, .. } if base == addr => {
                format!("the {size}-byte allocation there was already freed")
            }
            f => format!("not the start of a live allocation: {f}"),
        }
    }

    /// The live region holding `addr`.
    pub fn region(&self, addr: u64) -> Option<Region> {
        let st = self.state.lock().unwrap();
        st.live
            .range(..=addr)
            .next_back()
            .map(|(_, r)| r.clone())
            .filter(|r| addr < r.base + r.size)
    }

    /// A snapshot of the live allocations (cached until the next alloc or free).
    pub fn view(&self) -> Arc<MemView> {
        Self::view_of(&mut self.state.lock().unwrap())
    }

    fn view_of(st: &mut State) -> Arc<MemView> {
        if let Some(v) = &st.view {
            return v.clone();
        }
        let v = Arc::new(MemView {
            spans: st
                .live
                .values()
                .map(|r| (r.base, r.base + r.size, r.data.ptr))
                .collect(),
            _keep: st.live.values().map(|r| r.data.clone()).collect(),
            freed: st.freed.iter().copied().collect(),
        });
        st.view = Some(v.clone());
        v
    }

    /// Copies `dst.len()` bytes from device address `src`.
    pub fn read(&self, src: u64, dst: &mut [u8]) -> Result<(), Fault> {
        let view = self.view();
        let p = view.translate(src, dst.len() as u64)?;
        // SAFETY: translate checked the range; dst is host memory of that length.
        unsafe { std::ptr::copy(p, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` to device address `dst`.
    pub fn write(&self, dst: u64, src: &[u8]) -> Result<(), Fault> {
        let view = self.view();
        let p = view.translate(dst, src.len() as u64)?;
        // SAFETY: translate checked the range.
        unsafe { std::ptr::copy(src.as_ptr(), p, src.len()) };
        Ok(())
    }

    /// Sets `len` bytes at `dst` to `byte`.
    pub fn fill(&self, dst: u64, len: u64, byte: u8) -> Result<(), Fault> {
        let view = self.view();
        let p = view.translate(dst, len)?;
        // SAFETY: translate checked the range.
        unsafe { std::ptr::write_bytes(p, byte, len as usize) };
        Ok(())
    }

    /// Copies `len` bytes between two device ranges (which may overlap).
    pub fn copy(&self, dst: u64, src: u64, len: u64) -> Result<(), Fault> {
        let view = self.view();
        let s = view.translate(src, len)?;
        let d = view.translate(dst, len)?;
        // SAFETY: both ranges checked; `copy` allows overlap.
        unsafe { std::ptr::copy(s, d, len as usize) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_memory_is_nan_and_addresses_are_device_addresses() {
        let m = Memory::new(1, 1 << 20);
        let a = m.alloc(10).unwrap();
        assert!(a >= BASE + DEVICE_SPAN && a.is_multiple_of(ALIGN));
        let mut b = [0u8; 4];
        m.read(a, &mut b).unwrap();
        assert!(f32::from_le_bytes(b).is_nan());
    }

    #[test]
    fn out_of_bounds_freed_and_host_pointers_are_named() {
        let m = Memory::new(0, 1 << 20);
        let a = m.alloc(100).unwrap();
        let b = m.alloc(100).unwrap();
        let v = m.view();
        assert!(v.translate(a + 96, 4).is_ok());
        assert!(matches!(
            v.translate(a + 98, 4),
            Err(Fault::OutOfBounds { base, size: 100, .. }) if base == a
        ));
        // Past the end lands in the red zone, never in the next allocation.
        assert!(b >= a + 256 + RED_ZONE);
        assert!(matches!(
            v.translate(a + 200, 4),
            Err(Fault::OutOfBounds { .. })
        ));
        let host = &v as *const _ as u64;
        assert!(matches!(v.translate(host, 4), Err(Fault::Unmapped { .. })));
        m.free(a).unwrap();
        assert!(matches!(m.view().translate(a, 4), Err(Fault::Freed { .. })));
        assert!(m.free(a).unwrap_err().contains("already freed"));
        assert!(m.free(b + 8).is_err());
        // The old view still works (it keeps the region alive).
        assert!(v.translate(a, 4).is_ok());
    }

    #[test]
    fn capacity_is_enforced() {
        let m = Memory::new(0, 1000);
        m.alloc(600).unwrap();
        assert!(matches!(m.alloc(600), Err(AllocError::OutOfMemory { .. })));
    }
}
