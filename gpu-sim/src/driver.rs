//! The CUDA driver API's C symbols, as cudarc calls them.
//!
//! Every export checks its arguments as the real driver does (a bad handle, an illegal launch
//! shape, an address outside device memory) and returns CUDA's code; details go to stderr and
//! to `cuGetErrorString`. No panic crosses the C boundary.

use crate::mem::Fault;
use crate::ptx;
use crate::runtime::{code, ctx_device, ctx_handle, set_current, sim, Failure, Func, Res};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Arc, Mutex};

type CUresult = c_int;
type Handle = *mut c_void;

/// Runs an export's body: its Failure becomes the returned code (and the detail is recorded),
/// a panic becomes CUDA_ERROR_UNKNOWN naming the simulator as the culprit.
pub(crate) fn guard(f: impl FnOnce() -> Res<()>) -> CUresult {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => code::SUCCESS,
        Ok(Err(e)) => {
            sim().note(&e);
            e.code
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let f = Failure::new(
                code::UNKNOWN,
                format!("internal error in gpu-sim (please report): {msg}"),
            );
            sim().note(&f);
            code::UNKNOWN
        }
    }
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure::new(code::INVALID_VALUE, msg)
}

/// Writes `v` through an out-pointer, refusing NULL.
///
/// # Safety
/// `p` is NULL or valid for a write of T.
unsafe fn out<T>(p: *mut T, v: T, what: &str) -> Res<()> {
    if p.is_null() {
        return Err(invalid(format!("{what}: the output pointer is NULL")));
    }
    // SAFETY: non-null, and the caller passes a pointer to a T.
    unsafe { p.write(v) };
    Ok(())
}

fn fault(f: Fault, what: &str) -> Failure {
    Failure::new(code::INVALID_VALUE, format!("{what}: {f}"))
}

// ---------------------------------------------------------------- init, device, context

#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    guard(|| {
        sim();
        Ok(())
    })
}

/// # Safety
/// `v` is NULL or points at an int.
#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    // SAFETY: caller contract.
    guard(|| unsafe { out(v, 13000, "cuDriverGetVersion") })
}

/// # Safety
/// `count` is NULL or points at an int.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    // SAFETY: caller contract.
    guard(|| unsafe { out(count, sim().devices.len() as c_int, "cuDeviceGetCount") })
}

/// # Safety
/// `dev` is NULL or points at an int.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(dev: *mut c_int, ordinal: c_int) -> CUresult {
    guard(|| {
        sim().device(u32::try_from(ordinal).map_err(|_| invalid("negative ordinal"))?)?;
        // SAFETY: caller contract.
        unsafe { out(dev, ordinal, "cuDeviceGet") }
    })
}

fn dev_of(d: c_int) -> Res<u32> {
    let d = u32::try_from(d).map_err(|_| Failure::new(code::INVALID_DEVICE, "negative device"))?;
    sim().device(d)?;
    Ok(d)
}

/// # Safety
/// `name` is NULL or has `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: c_int) -> CUresult {
    guard(|| {
        dev_of(dev)?;
        if name.is_null() || len <= 0 {
            return Err(invalid("cuDeviceGetName: no buffer"));
        }
        let s = sim().cfg.device_name();
        let n = s.len().min(len as usize - 1);
        // SAFETY: `name` has `len` bytes; n + 1 <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr() as *const c_char, name, n);
            *name.add(n) = 0;
        }
        Ok(())
    })
}

/// The attributes the engine and cudarc ask for; others are NOT_SUPPORTED would be too
/// strict for callers that probe, so a few common ones answer too.
fn attribute(a: c_int) -> Option<c_int> {
    let c = &sim().cfg;
    Some(match a {
        1 => 1024,                   // MAX_THREADS_PER_BLOCK
        2 => 1024,                   // MAX_BLOCK_DIM_X
        3 => 1024,                   // MAX_BLOCK_DIM_Y
        4 => 64,                     // MAX_BLOCK_DIM_Z
        5 => i32::MAX,               // MAX_GRID_DIM_X
        6 | 7 => 65535,              // MAX_GRID_DIM_Y/Z
        8 => 48 * 1024,              // MAX_SHARED_MEMORY_PER_BLOCK
        10 => 32,                    // WARP_SIZE
        12 => 65536,                 // MAX_REGISTERS_PER_BLOCK
        13 => 1_410_000,             // CLOCK_RATE (kHz)
        16 => c.sms as c_int,        // MULTIPROCESSOR_COUNT
        39 => 2048,                  // MAX_THREADS_PER_MULTIPROCESSOR
        75 => c.cc.0,                // COMPUTE_CAPABILITY_MAJOR
        76 => c.cc.1,                // COMPUTE_CAPABILITY_MINOR
        81 => 164 * 1024,            // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        97 => c.smem_optin as c_int, // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        115 => 1,                    // MEMORY_POOLS_SUPPORTED
        41 => 1,                     // UNIFIED_ADDRESSING
        _ => return None,
    })
}

/// # Safety
/// `pi` is NULL or points at an int.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    dev: c_int,
) -> CUresult {
    guard(|| {
        dev_of(dev)?;
        let v = attribute(attrib).ok_or_else(|| {
            invalid(format!(
                "cuDeviceGetAttribute: attribute {attrib} is not modelled by the simulator"
            ))
        })?;
        // SAFETY: caller contract.
        unsafe { out(pi, v, "cuDeviceGetAttribute") }
    })
}

/// # Safety
/// `bytes` is NULL or points at a usize.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) -> CUresult {
    guard(|| {
        let d = dev_of(dev)?;
        let cap = sim().device(d)?.mem.capacity() as usize;
        // SAFETY: caller contract.
        unsafe { out(bytes, cap, "cuDeviceTotalMem") }
    })
}

/// # Safety
/// `pctx` is NULL or points at a pointer.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut Handle, dev: c_int) -> CUresult {
    guard(|| {
        let d = dev_of(dev)?;
        // SAFETY: caller contract.
        unsafe { out(pctx, ctx_handle(d) as Handle, "cuDevicePrimaryCtxRetain") }
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: c_int) -> CUresult {
    guard(|| dev_of(dev).map(|_| ()))
}

/// # Safety
/// `pctx` is NULL or points at a pointer.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut Handle) -> CUresult {
    guard(|| {
        let h = crate::runtime::current().map_or(0, ctx_handle);
        // SAFETY: caller contract.
        unsafe { out(pctx, h as Handle, "cuCtxGetCurrent") }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: Handle) -> CUresult {
    guard(|| {
        if ctx.is_null() {
            set_current(None);
            return Ok(());
        }
        let d = ctx_device(ctx as u64).ok_or_else(|| {
            Failure::new(code::INVALID_CONTEXT, format!("{ctx:?} is not a context"))
        })?;
        set_current(Some(d));
        Ok(())
    })
}

/// # Safety
/// `dev` is NULL or points at an int.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut c_int) -> CUresult {
    guard(|| {
        let d = sim().current_device()?.ordinal;
        // SAFETY: caller contract.
        unsafe { out(dev, d as c_int, "cuCtxGetDevice") }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    guard(|| sim().current_device()?.sync_all())
}

// ---------------------------------------------------------------- errors

fn error_text(e: c_int) -> Option<(&'static CStr, &'static CStr)> {
    Some(match e {
        0 => (c"CUDA_SUCCESS", c"no error"),
        1 => (c"CUDA_ERROR_INVALID_VALUE", c"invalid argument"),
        2 => (c"CUDA_ERROR_OUT_OF_MEMORY", c"out of memory"),
        3 => (c"CUDA_ERROR_NOT_INITIALIZED", c"initialization error"),
        100 => (
            c"CUDA_ERROR_NO_DEVICE",
            c"no CUDA-capable device is detected",
        ),
        101 => (c"CUDA_ERROR_INVALID_DEVICE", c"invalid device ordinal"),
        200 => (
            c"CUDA_ERROR_INVALID_IMAGE",
            c"device kernel image is invalid",
        ),
        201 => (c"CUDA_ERROR_INVALID_CONTEXT", c"invalid device context"),
        218 => (c"CUDA_ERROR_INVALID_PTX", c"a PTX JIT compilation failed"),
        400 => (c"CUDA_ERROR_INVALID_HANDLE", c"invalid resource handle"),
        500 => (c"CUDA_ERROR_NOT_FOUND", c"named symbol not found"),
        600 => (c"CUDA_ERROR_NOT_READY", c"device not ready"),
        700 => (
            c"CUDA_ERROR_ILLEGAL_ADDRESS",
            c"an illegal memory access was encountered",
        ),
        701 => (
            c"CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
            c"too many resources requested for launch",
        ),
        716 => (c"CUDA_ERROR_MISALIGNED_ADDRESS", c"misaligned address"),
        719 => (c"CUDA_ERROR_LAUNCH_FAILED", c"unspecified launch failure"),
        801 => (c"CUDA_ERROR_NOT_SUPPORTED", c"operation not supported"),
        999 => (c"CUDA_ERROR_UNKNOWN", c"unknown error"),
        _ => return None,
    })
}

/// # Safety
/// `p` is NULL or points at a pointer.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(e: c_int, p: *mut *const c_char) -> CUresult {
    guard(|| {
        let (name, _) = error_text(e).ok_or_else(|| invalid(format!("unknown CUresult {e}")))?;
        // SAFETY: caller contract.
        unsafe { out(p, name.as_ptr(), "cuGetErrorName") }
    })
}

/// The standard text, or the simulator's detail for the latest error with this code (what
/// failed, where, and why), so callers that print the string show the details.
///
/// # Safety
/// `p` is NULL or points at a pointer.
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(e: c_int, p: *mut *const c_char) -> CUresult {
    guard(|| {
        let (_, text) = error_text(e).ok_or_else(|| invalid(format!("unknown CUresult {e}")))?;
        let s = sim().detail(e).unwrap_or(text.as_ptr());
        // SAFETY: caller contract.
        unsafe { out(p, s, "cuGetErrorString") }
    })
}

// ---------------------------------------------------------------- memory

fn alloc(bytes: usize) -> Res<u64> {
    let dev = sim().current_device()?;
    dev.check_sticky()?;
    if bytes == 0 {
        return Err(invalid("allocating 0 bytes"));
    }
    dev.mem
        .alloc(bytes as u64)
        .map_err(|e| Failure::new(code::OUT_OF_MEMORY, format!("cuda:{}: {e}", dev.ordinal)))
}

/// # Safety
/// `dptr` is NULL or points at a u64.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut u64, bytes: usize) -> CUresult {
    // SAFETY: caller contract.
    guard(|| unsafe { out(dptr, alloc(bytes)?, "cuMemAlloc") })
}

/// # Safety
/// `dptr` is NULL or points at a u64.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(dptr: *mut u64, bytes: usize, stream: Handle) -> CUresult {
    guard(|| {
        sim().stream_device(stream as u64)?;
        // SAFETY: caller contract.
        unsafe { out(dptr, alloc(bytes)?, "cuMemAllocAsync") }
    })
}

/// Checks now that `addr` is a live allocation's start (the real driver refuses others at the
/// call), then frees it in stream order.
fn free_async(addr: u64, stream: u64) -> Res<()> {
    let s = sim();
    let dev = s.stream_device(stream)?;
    match dev.mem.region(addr) {
        Some(r) if r.base == addr => {}
        _ => {
            return Err(invalid(format!(
                "cuMemFree({addr:#x}): {}",
                dev.mem.free_check_message(addr)
            )))
        }
    }
    s.enqueue(
        stream,
        format!("free {addr:#x}"),
        Box::new(move |d| {
            d.mem
                .free(addr)
                .map_err(|m| Failure::new(code::INVALID_VALUE, m))
        }),
    )
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync(dptr: u64, stream: Handle) -> CUresult {
    guard(|| free_async(dptr, stream as u64))
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(dptr: u64) -> CUresult {
    guard(|| {
        let dev = sim().current_device()?;
        // cuMemFree synchronises with the device first.
        dev.sync_all()?;
        dev.mem
            .free(dptr)
            .map_err(|m| Failure::new(code::INVALID_VALUE, m))
    })
}

/// # Safety
/// Each pointer is NULL or points at a usize.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    guard(|| {
        let dev = sim().current_device()?;
        let (cap, used) = (dev.mem.capacity(), dev.mem.used());
        // SAFETY: caller contract.
        unsafe {
            out(free, cap.saturating_sub(used) as usize, "cuMemGetInfo")?;
            out(total, cap as usize, "cuMemGetInfo")
        }
    })
}

fn check_range(addr: u64, len: usize, what: &str, stream: u64) -> Res<()> {
    if len == 0 {
        return Ok(());
    }
    let dev = sim().stream_device(stream)?;
    dev.mem
        .view()
        .translate(addr, len as u64)
        .map(|_| ())
        .map_err(|f| fault(f, what))
}

fn memset_async(dst: u64, v: u8, n: usize, stream: u64) -> Res<()> {
    check_range(dst, n, "cuMemsetD8", stream)?;
    if n == 0 {
        return Ok(());
    }
    sim().enqueue(
        stream,
        format!("memset {dst:#x} {n} bytes"),
        Box::new(move |d| {
            d.mem
                .fill(dst, n as u64, v)
                .map_err(|f| Failure::new(code::ILLEGAL_ADDRESS, format!("memset: {f}")))
        }),
    )
}

#[no_mangle]
pub extern "C" fn cuMemsetD8Async(dst: u64, v: u8, n: usize, stream: Handle) -> CUresult {
    guard(|| memset_async(dst, v, n, stream as u64))
}

#[no_mangle]
pub extern "C" fn cuMemsetD8_v2(dst: u64, v: u8, n: usize) -> CUresult {
    guard(|| {
        memset_async(dst, v, n, 0)?;
        sim().current_device()?.sync_stream(0)
    })
}

/// Stages the host bytes now (pageable memory: the caller may reuse them when this returns),
/// writes them in stream order.
///
/// # Safety
/// `src` holds `n` bytes.
unsafe fn htod(dst: u64, src: *const c_void, n: usize, stream: u64) -> Res<()> {
    check_range(dst, n, "cuMemcpyHtoD (destination)", stream)?;
    if n == 0 {
        return Ok(());
    }
    if src.is_null() {
        return Err(invalid("cuMemcpyHtoD: the host source is NULL"));
    }
    // SAFETY: the caller passes `n` readable bytes.
    let data = unsafe { std::slice::from_raw_parts(src as *const u8, n) }.to_vec();
    sim().enqueue(
        stream,
        format!("copy {n} bytes host -> {dst:#x}"),
        Box::new(move |d| {
            d.mem.write(dst, &data).map_err(|f| {
                Failure::new(code::ILLEGAL_ADDRESS, format!("host-to-device copy: {f}"))
            })
        }),
    )
}

/// # Safety
/// `src` holds `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: u64,
    src: *const c_void,
    n: usize,
    stream: Handle,
) -> CUresult {
    // SAFETY: caller contract.
    guard(|| unsafe { htod(dst, src, n, stream as u64) })
}

/// # Safety
/// `src` holds `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: u64, src: *const c_void, n: usize) -> CUresult {
    guard(|| {
        // SAFETY: caller contract.
        unsafe { htod(dst, src, n, 0)? };
        sim().current_device()?.sync_stream(0)
    })
}

/// Device-to-host into pageable memory is synchronous, as the real driver makes it: the stream
/// runs up to and including the copy before this returns.
///
/// # Safety
/// `dst` has room for `n` bytes.
unsafe fn dtoh(dst: *mut c_void, src: u64, n: usize, stream: u64) -> Res<()> {
    check_range(src, n, "cuMemcpyDtoH (source)", stream)?;
    if n == 0 {
        return Ok(());
    }
    if dst.is_null() {
        return Err(invalid("cuMemcpyDtoH: the host destination is NULL"));
    }
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    let s = sim();
    s.enqueue(
        stream,
        format!("copy {n} bytes {src:#x} -> host"),
        Box::new(move |d| {
            let mut buf = vec![0u8; n];
            d.mem.read(src, &mut buf).map_err(|f| {
                Failure::new(code::ILLEGAL_ADDRESS, format!("device-to-host copy: {f}"))
            })?;
            *o.lock().unwrap() = buf;
            Ok(())
        }),
    )?;
    s.stream_device(stream)?.sync_stream(stream)?;
    let data = out.lock().unwrap();
    if data.len() == n {
        // SAFETY: `dst` has room for n bytes (caller contract).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, n) };
    }
    Ok(())
}

/// # Safety
/// `dst` has room for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: u64,
    n: usize,
    stream: Handle,
) -> CUresult {
    // SAFETY: caller contract.
    guard(|| unsafe { dtoh(dst, src, n, stream as u64) })
}

/// # Safety
/// `dst` has room for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: u64, n: usize) -> CUresult {
    // SAFETY: caller contract.
    guard(|| unsafe { dtoh(dst, src, n, 0) })
}

fn dtod(dst: u64, src: u64, n: usize, stream: u64) -> Res<()> {
    check_range(src, n, "cuMemcpyDtoD (source)", stream)?;
    check_range(dst, n, "cuMemcpyDtoD (destination)", stream)?;
    if n == 0 {
        return Ok(());
    }
    sim().enqueue(
        stream,
        format!("copy {n} bytes {src:#x} -> {dst:#x}"),
        Box::new(move |d| {
            d.mem.copy(dst, src, n as u64).map_err(|f| {
                Failure::new(code::ILLEGAL_ADDRESS, format!("device-to-device copy: {f}"))
            })
        }),
    )
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync_v2(dst: u64, src: u64, n: usize, stream: Handle) -> CUresult {
    guard(|| dtod(dst, src, n, stream as u64))
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoD_v2(dst: u64, src: u64, n: usize) -> CUresult {
    guard(|| {
        dtod(dst, src, n, 0)?;
        sim().current_device()?.sync_stream(0)
    })
}

// ---------------------------------------------------------------- modules and functions

/// # Safety
/// `module` is NULL or points at a pointer; `image` is a NUL-terminated PTX text.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut Handle, image: *const c_void) -> CUresult {
    guard(|| {
        if image.is_null() {
            return Err(invalid("cuModuleLoadData: image is NULL"));
        }
        // SAFETY: the caller passes a NUL-terminated image (PTX is text).
        let bytes = unsafe { CStr::from_ptr(image as *const c_char) }.to_bytes();
        let text = std::str::from_utf8(bytes).map_err(|_| {
            Failure::new(
                code::INVALID_IMAGE,
                "cuModuleLoadData: the image is not PTX text (cubin and fatbin images cannot run \
                 on the simulator; load PTX)",
            )
        })?;
        if !text.contains(".version") || !text.contains(".target") {
            return Err(Failure::new(
                code::INVALID_IMAGE,
                "cuModuleLoadData: the image is not PTX text (no .version/.target)",
            ));
        }
        let h = crate::runtime::load_module(text)?;
        // SAFETY: caller contract.
        unsafe { out(module, h as Handle, "cuModuleLoadData") }
    })
}

#[no_mangle]
pub extern "C" fn cuModuleUnload(module: Handle) -> CUresult {
    guard(|| crate::runtime::unload_module(module as u64))
}

/// # Safety
/// `hfunc` is NULL or points at a pointer; `name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    hfunc: *mut Handle,
    module: Handle,
    name: *const c_char,
) -> CUresult {
    guard(|| {
        let s = sim();
        let m = s
            .modules
            .lock()
            .unwrap()
            .get(&(module as u64))
            .cloned()
            .ok_or_else(|| {
                Failure::new(
                    code::INVALID_HANDLE,
                    format!("module {module:?} does not exist"),
                )
            })?;
        if name.is_null() {
            return Err(invalid("cuModuleGetFunction: name is NULL"));
        }
        // SAFETY: NUL-terminated (caller contract).
        let name = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        let kernel = m.module.kernel(&name).ok_or_else(|| {
            Failure::new(
                code::NOT_FOUND,
                format!(
                    "{}: no kernel `{name}` (entries: {})",
                    m.name,
                    m.module.kernel_names().join(", ")
                ),
            )
        })?;
        let h = s.handle();
        let max_dyn = (48 * 1024u32).saturating_sub(kernel.static_smem());
        s.funcs.lock().unwrap().insert(
            h,
            Arc::new(Func {
                device: m.device,
                module: module as u64,
                kernel,
                max_dyn_smem: Mutex::new(max_dyn),
            }),
        );
        // SAFETY: caller contract.
        unsafe { out(hfunc, h as Handle, "cuModuleGetFunction") }
    })
}

fn func(h: Handle) -> Res<Arc<Func>> {
    sim()
        .funcs
        .lock()
        .unwrap()
        .get(&(h as u64))
        .cloned()
        .ok_or_else(|| {
            Failure::new(
                code::INVALID_HANDLE,
                format!("function {h:?} does not exist"),
            )
        })
}

#[no_mangle]
pub extern "C" fn cuFuncSetAttribute(hfunc: Handle, attrib: c_int, value: c_int) -> CUresult {
    guard(|| {
        let f = func(hfunc)?;
        match attrib {
            // MAX_DYNAMIC_SHARED_SIZE_BYTES
            8 => {
                let optin = sim().cfg.smem_optin;
                let st = f.kernel.static_smem();
                if value < 0 || value as u64 + st as u64 > optin as u64 {
                    return Err(invalid(format!(
                        "{}: {value} bytes of dynamic shared memory plus {st} static exceed the \
                         {optin} a block may opt in to on this GPU",
                        f.kernel.name()
                    )));
                }
                *f.max_dyn_smem.lock().unwrap() = value as u32;
                Ok(())
            }
            // PREFERRED_SHARED_MEMORY_CARVEOUT: a hint.
            9 => Ok(()),
            _ => Err(invalid(format!(
                "cuFuncSetAttribute: attribute {attrib} is not modelled by the simulator"
            ))),
        }
    })
}

/// # Safety
/// `pi` is NULL or points at an int.
#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    hfunc: Handle,
) -> CUresult {
    guard(|| {
        let f = func(hfunc)?;
        let k = &f.kernel;
        let v = match attrib {
            0 => k.max_threads().unwrap_or(1024).min(1024) as c_int,
            1 => k.static_smem() as c_int,
            2 => 0,
            3 => k.local_bytes() as c_int,
            4 => k.num_regs() as c_int,
            5 => 90,
            6 => sim().cfg.cc.0 * 10 + sim().cfg.cc.1,
            8 => *f.max_dyn_smem.lock().unwrap() as c_int,
            _ => {
                return Err(invalid(format!(
                    "cuFuncGetAttribute: attribute {attrib} is not modelled by the simulator"
                )))
            }
        };
        // SAFETY: caller contract.
        unsafe { out(pi, v, "cuFuncGetAttribute") }
    })
}

/// Checks a launch as the driver does, then queues it.
///
/// # Safety
/// `params` holds one pointer per kernel parameter, each to a value of that parameter's size.
#[allow(clippy::too_many_arguments)]
unsafe fn launch(
    hfunc: Handle,
    grid: [u32; 3],
    block: [u32; 3],
    smem: u32,
    stream: u64,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> Res<()> {
    let s = sim();
    let f = func(hfunc)?;
    let dev = s.stream_device(stream)?;
    dev.check_sticky()?;
    let k = &f.kernel;
    let name = k.name().to_string();
    if f.device != dev.ordinal {
        return Err(Failure::new(
            code::INVALID_CONTEXT,
            format!(
                "{name}: a function of device {} launched on device {}",
                f.device, dev.ordinal
            ),
        ));
    }
    if !extra.is_null() {
        return Err(invalid(format!(
            "{name}: `extra` launch arguments are not supported; pass kernelParams"
        )));
    }
    let threads = block.iter().map(|&b| b as u64).product::<u64>();
    if block.contains(&0) || block[0] > 1024 || block[1] > 1024 || block[2] > 64 || threads > 1024 {
        return Err(invalid(format!(
            "{name}: block {block:?} is not a legal CUDA block"
        )));
    }
    if grid.contains(&0) || grid[0] > i32::MAX as u32 || grid[1] > 65535 || grid[2] > 65535 {
        return Err(invalid(format!(
            "{name}: grid {grid:?} is not a legal CUDA grid"
        )));
    }
    if let Some(m) = k.max_threads().filter(|&m| threads > m as u64) {
        return Err(Failure::new(
            code::LAUNCH_OUT_OF_RESOURCES,
            format!("{name}: a block of {threads} threads exceeds the kernel's .maxntid {m}"),
        ));
    }
    if let Some(r) = k.req_ntid().filter(|&r| r != block) {
        return Err(Failure::new(
            code::LAUNCH_OUT_OF_RESOURCES,
            format!("{name}: block {block:?}, the kernel's .reqntid is {r:?}"),
        ));
    }
    let max_dyn = *f.max_dyn_smem.lock().unwrap();
    if smem > max_dyn {
        return Err(invalid(format!(
            "{name}: {smem} bytes of dynamic shared memory exceed the {max_dyn} allowed ({} static; \
             more needs cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES))",
            k.static_smem()
        )));
    }
    let infos = k.params();
    if !infos.is_empty() && params.is_null() {
        return Err(invalid(format!(
            "{name}: takes {} parameters but kernelParams is NULL",
            infos.len()
        )));
    }
    let mut buf = vec![0u8; k.param_bytes()];
    for (i, p) in infos.iter().enumerate() {
        // SAFETY: kernelParams has one entry per parameter (caller contract).
        let src = unsafe { *params.add(i) };
        if src.is_null() {
            return Err(invalid(format!("{name}: kernelParams[{i}] is NULL")));
        }
        let (o, n) = (p.offset as usize, p.size as usize);
        // SAFETY: each entry points at a value of the parameter's size (caller contract).
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, buf[o..o + n].as_mut_ptr(), n) };
    }
    if let Some((kname, i, j)) = &s.cfg.faults.swap_args {
        if *kname == name
            && *i < infos.len()
            && *j < infos.len()
            && infos[*i].size == infos[*j].size
        {
            let (a, b) = (infos[*i], infos[*j]);
            let va = buf[a.offset as usize..(a.offset + a.size) as usize].to_vec();
            buf.copy_within(
                b.offset as usize..(b.offset + b.size) as usize,
                a.offset as usize,
            );
            buf[b.offset as usize..(b.offset + b.size) as usize].copy_from_slice(&va);
        }
    }
    let kernel = k.clone();
    let racecheck = s.cfg.racecheck;
    s.enqueue(
        stream,
        format!("{name}<<<{grid:?}, {block:?}, {smem}>>>"),
        Box::new(move |d| {
            let view = d.mem.view();
            let lp = ptx::LaunchParams {
                grid,
                block,
                dyn_smem: smem,
                params: &buf,
            };
            match ptx::launch(&kernel, &lp, &view, &ptx::Checks { racecheck }) {
                Ok(stats) => {
                    d.count_launch(&stats);
                    Ok(())
                }
                Err(fault) => Err(Failure::new(
                    match fault.kind {
                        ptx::FaultKind::Memcheck => code::ILLEGAL_ADDRESS,
                        _ => code::LAUNCH_FAILED,
                    },
                    fault.to_string(),
                )),
            }
        }),
    )
}

/// # Safety
/// As `cuLaunchKernel`: `params` holds a pointer to each parameter's value.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuLaunchKernel(
    f: Handle,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    smem: c_uint,
    stream: Handle,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    // SAFETY: caller contract.
    guard(|| unsafe {
        launch(
            f,
            [gx, gy, gz],
            [bx, by, bz],
            smem,
            stream as u64,
            params,
            extra,
        )
    })
}

// ---------------------------------------------------------------- streams and events

/// # Safety
/// `ph` is NULL or points at a pointer.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(ph: *mut Handle, flags: c_uint) -> CUresult {
    guard(|| {
        // CU_STREAM_NON_BLOCKING = 1: not ordered with the legacy default stream.
        let h = sim().create_stream(flags & 1 == 0)?;
        // SAFETY: caller contract.
        unsafe { out(ph, h as Handle, "cuStreamCreate") }
    })
}

/// # Safety
/// As cuStreamCreate.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    ph: *mut Handle,
    flags: c_uint,
    _prio: c_int,
) -> CUresult {
    // SAFETY: caller contract.
    unsafe { cuStreamCreate(ph, flags) }
}

#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(stream: Handle) -> CUresult {
    guard(|| sim().destroy_stream(stream as u64))
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(stream: Handle) -> CUresult {
    guard(|| {
        sim()
            .stream_device(stream as u64)?
            .sync_stream(stream as u64)
    })
}

/// Runs the stream's work (a query is a wait that the caller polls) and says it is done.
#[no_mangle]
pub extern "C" fn cuStreamQuery(stream: Handle) -> CUresult {
    guard(|| {
        sim()
            .stream_device(stream as u64)?
            .sync_stream(stream as u64)
    })
}

#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(stream: Handle, ev: Handle, _flags: c_uint) -> CUresult {
    guard(|| sim().wait_event(stream as u64, ev as u64))
}

/// # Safety
/// `ph` is NULL or points at a pointer.
#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(ph: *mut Handle, _flags: c_uint) -> CUresult {
    guard(|| {
        let h = sim().create_event()?;
        // SAFETY: caller contract.
        unsafe { out(ph, h as Handle, "cuEventCreate") }
    })
}

#[no_mangle]
pub extern "C" fn cuEventRecord(ev: Handle, stream: Handle) -> CUresult {
    guard(|| sim().record_event(ev as u64, stream as u64))
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(ev: Handle) -> CUresult {
    guard(|| sim().sync_event(ev as u64))
}

/// Runs the work up to the record (as cuStreamQuery does), then reports it complete.
#[no_mangle]
pub extern "C" fn cuEventQuery(ev: Handle) -> CUresult {
    guard(|| {
        sim().sync_event(ev as u64)?;
        if sim().event_done(ev as u64)? {
            Ok(())
        } else {
            Err(Failure::new(code::NOT_READY, "event not complete"))
        }
    })
}

#[no_mangle]
pub extern "C" fn cuEventDestroy_v2(ev: Handle) -> CUresult {
    guard(|| sim().destroy_event(ev as u64))
}

/// # Safety
/// `ms` is NULL or points at an f32.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: Handle,
    end: Handle,
) -> CUresult {
    guard(|| {
        let t = sim().elapsed(start as u64, end as u64)?;
        // SAFETY: caller contract.
        unsafe { out(ms, t, "cuEventElapsedTime") }
    })
}

/// # Safety
/// As cuEventElapsedTime_v2.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: Handle, end: Handle) -> CUresult {
    // SAFETY: caller contract.
    unsafe { cuEventElapsedTime_v2(ms, start, end) }
}
