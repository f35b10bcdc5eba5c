//! The [`Cuda`] handle: the context and stream of one GPU, loaded modules and functions,
//! cuBLAS(Lt), scratch and reduction buffers; or a dry run that records launches instead.

use super::buffers::DBuf;
use super::ptx_check::{
    check_launch, kernel_info, Dim3, KernelInfo, DEFAULT_SMEM, MAX_SMEM_OPT_IN,
};
use super::{blas, probe_driver, registry, KERNELS_COMPILED, NO_KERNELS_MSG};
use crate::elem::Elem;
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// embedding_bwd's host workspace: the ids, their grouped order, group starts and ids, and the
/// concatenated upload.
#[derive(Default)]
pub(crate) struct EmbedPlan {
    pub ids: Vec<i32>,
    pub order: Vec<i32>,
    pub seg: Vec<i32>,
    pub seg_id: Vec<i32>,
    pub plan: Vec<i32>,
}

/// One kernel launch as a dry run recorded it (after it passed [`check_launch`]).
#[derive(Clone, Debug)]
pub struct LaunchRecord {
    pub module: String,
    pub name: String,
    pub grid: Dim3,
    pub block: Dim3,
    pub smem: u32,
    /// Each argument's bits, as the driver would read them.
    pub args: Vec<u64>,
    /// Each argument's [`KernelArg::CODE`].
    pub kinds: Vec<u8>,
}

/// A kernel's PTX facts (parsed once per backend) and the dynamic shared memory it has been
/// opted in to (0: never).
struct KernelEntry {
    module: String,
    name: String,
    info: KernelInfo,
    opt_in: u32,
}

/// What only an opened GPU has.
struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: cudarc::cublas::CudaBlas,
    /// cuBLASLt's handle, workspace and plans; None when the matmuls use cublasGemmEx.
    lt: Option<blas::Lt>,
    modules: Mutex<Vec<Option<Arc<CudaModule>>>>,
    /// Loaded functions by (module, entry name).
    funcs: Mutex<Vec<(String, String, CudaFunction)>>,
    scratch_f32: Mutex<Option<CudaSlice<u8>>>,
    scratch_i32: Mutex<Option<CudaSlice<u8>>>,
    /// [0]: a reduction's result, [1..=1024]: its per-block partials (at `Inner::reduce_ptr`).
    reduce: CudaSlice<f64>,
}

/// A dry run's state: fake device addresses and the launches made.
struct DryRun {
    /// Next fake address (256-aligned, far above any size a kernel is passed).
    next: AtomicU64,
    launches: Mutex<Vec<LaunchRecord>>,
}

/// Where a dry run's fake device addresses start; pointers below it are not device memory.
pub const DRY_RUN_BASE: u64 = 0x7f00_0000_0000;

struct Inner {
    ordinal: usize,
    name: String,
    sm_count: u32,
    hopper: bool,
    /// The GPU; None in a dry run.
    dev: Option<Device>,
    /// Some in a dry run.
    dry: Option<DryRun>,
    kernels: Mutex<Vec<KernelEntry>>,
    reduce_ptr: u64,
    /// Host workspace of embedding_bwd, reused across steps.
    embed_plan: Mutex<EmbedPlan>,
}

/// The CUDA backend on one GPU. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

impl Cuda {
    /// Opens GPU `ordinal`. Fails with a message naming the fix when there is no driver, no GPU,
    /// no cuBLAS, or the build has no kernels.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        let count = probe_driver()?;
        if !KERNELS_COMPILED || registry::PTX.is_empty() {
            return Err(Error::Device(NO_KERNELS_MSG.into()));
        }
        if ordinal >= count {
            return Err(Error::Device(format!(
                "cuda:{ordinal} requested but the driver reports {count} GPU(s) (cuda:0..{})",
                count - 1
            )));
        }
        // SAFETY: only tries to dlopen libcublas.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device(
                "libcublas was not found: install the CUDA toolkit's cuBLAS (or `pip install \
                 nvidia-cublas`) and add its lib directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let dev = |e: cudarc::driver::DriverError| Error::Device(format!("cuda:{ordinal}: {e}"));
        let ctx = CudaContext::new(ordinal).map_err(dev)?;
        // SAFETY: every op runs on one stream, in order, so cudarc's per-buffer events (which
        // order work across streams) are not needed; views carry raw pointers anyway.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = cudarc::cublas::CudaBlas::new(stream.clone())
            .map_err(|e| Error::Device(format!("cuda:{ordinal}: cuBLAS: {e}")))?;
        let lt = blas::Lt::from_env(&stream, ordinal)?;
        let (major, minor) = ctx.compute_capability().map_err(dev)?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(dev)? as u32;
        let gpu = ctx.name().map_err(dev)?;
        let reduce = stream.alloc_zeros::<f64>(1025).map_err(dev)?;
        let reduce_ptr = raw_ptr(&reduce, &stream);
        Ok(Cuda {
            inner: Arc::new(Inner {
                ordinal,
                name: format!("cuda:{ordinal} ({gpu}, sm_{major}{minor}, bf16 compute)"),
                sm_count,
                hopper: (major, minor) == (9, 0),
                dev: Some(Device {
                    modules: Mutex::new(vec![None; registry::PTX.len()]),
                    funcs: Mutex::new(Vec::new()),
                    scratch_f32: Mutex::new(None),
                    scratch_i32: Mutex::new(None),
                    reduce,
                    ctx,
                    stream,
                    blas,
                    lt,
                }),
                dry: None,
                kernels: Mutex::new(Vec::new()),
                reduce_ptr,
                embed_plan: Mutex::new(EmbedPlan::default()),
            }),
        })
    }

    /// A backend without a GPU for checking launches: ops run their host-side checks and
    /// launches are checked against the embedded PTX exactly as on a GPU, then recorded
    /// ([`Cuda::dry_launches`]) instead of run. Buffers get fake addresses (from
    /// [`DRY_RUN_BASE`], 256-aligned) and hold no data: copies do nothing, reads give zeros,
    /// cuBLAS matmuls are skipped. `sm_count` and `hopper` stand for the GPU being modelled.
    pub fn dry_run(sm_count: u32, hopper: bool) -> Result<Cuda> {
        if !KERNELS_COMPILED || registry::PTX.is_empty() {
            return Err(Error::Device(NO_KERNELS_MSG.into()));
        }
        let dry = DryRun {
            next: AtomicU64::new(DRY_RUN_BASE),
            launches: Mutex::new(Vec::new()),
        };
        let reduce_ptr = dry.alloc(1025 * 8);
        Ok(Cuda {
            inner: Arc::new(Inner {
                ordinal: 0,
                name: format!("cuda dry run ({sm_count} SMs)"),
                sm_count: sm_count.max(1),
                hopper,
                dev: None,
                dry: Some(dry),
                kernels: Mutex::new(Vec::new()),
                reduce_ptr,
                embed_plan: Mutex::new(EmbedPlan::default()),
            }),
        })
    }

    /// The launches a dry run has recorded so far (empty on a GPU).
    pub fn dry_launches(&self) -> Vec<LaunchRecord> {
        self.inner
            .dry
            .as_ref()
            .map(|d| d.launches.lock().unwrap().clone())
            .unwrap_or_default()
    }

    /// Whether this is a [`Cuda::dry_run`] backend.
    pub fn is_dry_run(&self) -> bool {
        self.inner.dry.is_some()
    }

    /// The GPU's handles. Panics on a dry run, which no caller that needs a GPU is given.
    fn dev(&self) -> &Device {
        self.inner
            .dev
            .as_ref()
            .expect("a dry-run CUDA backend has no GPU context or stream")
    }

    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// Streaming multiprocessors, for sizing grids.
    pub fn sm_count(&self) -> u32 {
        self.inner.sm_count
    }

    /// The GPU's context (panics on a dry run).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.dev().ctx
    }

    /// The stream every op of this backend runs on, in order (panics on a dry run).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.dev().stream
    }

    pub(crate) fn blas(&self) -> &cudarc::cublas::CudaBlas {
        &self.dev().blas
    }

    pub(super) fn lt(&self) -> Option<&blas::Lt> {
        self.dev().lt.as_ref()
    }

    /// The PTX of `module`: its compute_90a build on an sm_90 GPU when the file asked for one.
    /// Returns the module's index in the registry too.
    fn module_source(&self, module: &str) -> Result<(usize, &'static str)> {
        let idx = registry::PTX
            .iter()
            .position(|(m, _)| *m == module)
            .ok_or_else(|| {
                Error::Device(format!(
                    "kernel module `{module}` is not in this build (expected kernels-cu/{module}.cu)"
                ))
            })?;
        let hopper_ptx = registry::PTX_SM90A
            .iter()
            .find(|(m, _)| *m == module)
            .filter(|_| self.inner.hopper);
        Ok((idx, hopper_ptx.unwrap_or(&registry::PTX[idx]).1))
    }

    /// Runs `f` on the PTX facts of `module::name` (parsed on first use); fails if the module
    /// has no such entry.
    fn with_kernel<R>(
        &self,
        module: &str,
        name: &str,
        f: impl FnOnce(&mut KernelEntry) -> R,
    ) -> Result<R> {
        let mut ks = self.inner.kernels.lock().unwrap();
        let i = match ks.iter().position(|e| e.module == module && e.name == name) {
            Some(i) => i,
            None => {
                let (_, ptx) = self.module_source(module)?;
                let info = kernel_info(ptx, name).ok_or_else(|| {
                    Error::Device(format!(
                        "kernel `{name}` is not an entry of kernels-cu/{module}.cu (no `.entry \
                         {name}(` in its PTX; is it `extern \"C\" __global__`?)"
                    ))
                })?;
                ks.push(KernelEntry {
                    module: module.to_string(),
                    name: name.to_string(),
                    info,
                    opt_in: 0,
                });
                ks.len() - 1
            }
        };
        Ok(f(&mut ks[i]))
    }

    /// The loaded kernel `name` of module `module` (the stem of `kernels-cu/<module>.cu`).
    /// Each module is loaded once, on first use (its compute_90a build on an sm_90 GPU when the
    /// file asked for one); functions are cached, so this is a short lock and a scan. Fails on a
    /// dry run.
    pub fn func(&self, module: &str, name: &str) -> Result<CudaFunction> {
        let Some(dev) = &self.inner.dev else {
            return Err(Error::Device(format!(
                "{module}::{name}: a dry-run backend loads no kernels"
            )));
        };
        {
            let funcs = dev.funcs.lock().unwrap();
            if let Some((_, _, f)) = funcs.iter().find(|(m, n, _)| m == module && n == name) {
                return Ok(f.clone());
            }
        }
        let (idx, ptx) = self.module_source(module)?;
        let module_arc = {
            let mut mods = dev.modules.lock().unwrap();
            if mods[idx].is_none() {
                let m = dev
                    .ctx
                    .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                    .map_err(|e| {
                        Error::Device(format!(
                            "loading kernels-cu/{module}.cu's PTX: {e} (the driver may be older \
                             than the PTX: build with a CUDA 13.0 nvcc, see README)"
                        ))
                    })?;
                mods[idx] = Some(m);
            }
            mods[idx].clone().unwrap()
        };
        let f = module_arc.load_function(name).map_err(|e| {
            Error::Device(format!("kernel `{name}` in kernels-cu/{module}.cu: {e}"))
        })?;
        dev.funcs
            .lock()
            .unwrap()
            .push((module.to_string(), name.to_string(), f.clone()));
        Ok(f)
    }

    /// Lets `module::name` use `bytes` of dynamic shared memory per block: without this the
    /// driver allows 48 KiB less the kernel's static shared memory, and [`Cuda::launch`] refuses
    /// more. `Ok(None)` when it may (the attribute is set once per kernel, where needed);
    /// `Ok(Some(why))` when this GPU cannot give that much (callers fall back to another kernel).
    pub fn opt_in_smem(&self, module: &str, name: &str, bytes: u32) -> Result<Option<String>> {
        let static_smem = self.with_kernel(module, name, |e| {
            let fits =
                bytes <= DEFAULT_SMEM.saturating_sub(e.info.static_smem) || bytes <= e.opt_in;
            (!fits).then_some(e.info.static_smem)
        })?;
        let Some(static_smem) = static_smem else {
            return Ok(None);
        };
        if static_smem as u64 + bytes as u64 > MAX_SMEM_OPT_IN as u64 {
            return Ok(Some(format!(
                "{bytes} bytes of dynamic and {static_smem} of static shared memory exceed the \
                 {MAX_SMEM_OPT_IN} any supported GPU has per block"
            )));
        }
        if self.inner.dev.is_some() {
            let f = self.func(module, name)?;
            if let Err(e) = f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            ) {
                return Ok(Some(format!("{e:?}")));
            }
        }
        self.with_kernel(module, name, |e| e.opt_in = e.opt_in.max(bytes))?;
        Ok(None)
    }

    /// Launches `module::name`; `args` are the parameters' bits, one u64 each, and `kinds` their
    /// [`KernelArg::CODE`]s (the `launch!` macro builds both). First checks the call against the
    /// kernel's PTX ([`check_launch`]): a mismatch is an error, never a launch. A grid x of 0 is
    /// raised to 1. A dry run records the launch instead.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        module: &str,
        name: &str,
        grid: impl Into<Dim3>,
        block: impl Into<Dim3>,
        smem: u32,
        args: &mut [u64],
        kinds: &[u8],
    ) -> Result<()> {
        let (grid, block) = (grid.into(), block.into());
        let grid = Dim3(grid.0.max(1), grid.1, grid.2);
        self.with_kernel(module, name, |e| {
            check_launch(&e.info, e.opt_in, module, name, grid, block, smem, kinds)
        })?
        .map_err(Error::Device)?;
        if let Some(dry) = &self.inner.dry {
            dry.launches.lock().unwrap().push(LaunchRecord {
                module: module.to_string(),
                name: name.to_string(),
                grid,
                block,
                smem,
                args: args.to_vec(),
                kinds: kinds.to_vec(),
            });
            return Ok(());
        }
        let f = self.func(module, name)?;
        self.launch_func(
            &f,
            (grid.0, grid.1, grid.2),
            (block.0, block.1, block.2),
            smem,
            args,
        )
        .map_err(|e| match e {
            Error::Device(m) => Error::Device(format!("{module}::{name}: {m}")),
            e => e,
        })
    }

    /// Launches a loaded function with any grid and block shape, unchecked (prefer
    /// [`Cuda::launch`], which checks the call against the kernel's PTX).
    pub fn launch_func(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &mut [u64],
    ) -> Result<()> {
        const MAX_ARGS: usize = 24;
        assert!(
            args.len() <= MAX_ARGS,
            "at most {MAX_ARGS} kernel arguments"
        );
        self.bind()?;
        let mut ptrs = [std::ptr::null_mut::<c_void>(); MAX_ARGS];
        for (p, a) in ptrs.iter_mut().zip(args.iter_mut()) {
            *p = a as *mut u64 as *mut c_void;
        }
        // SAFETY: `f` is a live function of a module this context loaded; each parameter
        // pointer points at 8 bytes holding the value in the kernel's parameter type (device
        // pointers and i64 use all 8, f32/i32 the first 4); the callers have checked every
        // buffer's length against the dimensions they pass, so the kernel stays in bounds.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                grid,
                block,
                smem,
                self.dev().stream.cu_stream(),
                &mut ptrs[..args.len()],
            )
        }
        .map_err(|e| Error::Device(format!("launching a kernel: {e}")))
    }

    /// Makes this GPU's context current on the calling thread (the raw driver calls need it;
    /// a no-op when it already is, and on a dry run).
    pub fn bind(&self) -> Result<()> {
        let Some(dev) = &self.inner.dev else {
            return Ok(());
        };
        dev.ctx
            .bind_to_thread()
            .map_err(|e| self.dev_err("binding the CUDA context to this thread", e))
    }

    /// Copies `src` to device address `dst` on the stream (a no-op on a dry run). From pageable
    /// host memory the driver stages the data before returning, so `src` may be reused then.
    ///
    /// # Safety
    /// `dst` must be device memory of this backend with room for `src`.
    pub(crate) unsafe fn htod_raw<T: Copy>(&self, dst: u64, src: &[T]) -> Result<()> {
        let Some(dev) = &self.inner.dev else {
            return Ok(());
        };
        self.bind()?;
        // SAFETY: the caller guarantees `dst` holds src.len() elements.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, dev.stream.cu_stream()) }
            .map_err(|e| self.dev_err("host-to-device copy", e))
    }

    /// Copies device address `src` into `dst` and waits for it (leaves `dst` alone on a dry
    /// run).
    ///
    /// # Safety
    /// `src` must be device memory of this backend holding at least dst.len() elements.
    pub(crate) unsafe fn dtoh_raw<T: Copy>(&self, dst: &mut [T], src: u64) -> Result<()> {
        let Some(dev) = &self.inner.dev else {
            return Ok(());
        };
        self.bind()?;
        // SAFETY: the caller guarantees `src` holds dst.len() elements; the copy is complete
        // when synchronize returns, before dst can be used again.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, dev.stream.cu_stream()) }
            .map_err(|e| self.dev_err("device-to-host copy", e))?;
        self.sync_stream()
    }

    /// Copies `bytes` from device address `src` to `dst` on the stream (a no-op on a dry run).
    ///
    /// # Safety
    /// Both must be device memory of this backend with `bytes` bytes.
    pub(crate) unsafe fn dtod_raw(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        let Some(dev) = &self.inner.dev else {
            return Ok(());
        };
        self.bind()?;
        // SAFETY: the caller guarantees both ranges.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, dev.stream.cu_stream())
        }
        .map_err(|e| self.dev_err("device-to-device copy", e))
    }

    /// Zeroes `bytes` at device address `dst` on the stream (a no-op on a dry run).
    ///
    /// # Safety
    /// `dst` must be device memory of this backend with `bytes` bytes.
    pub(crate) unsafe fn memset_raw(&self, dst: u64, bytes: usize) -> Result<()> {
        let Some(dev) = &self.inner.dev else {
            return Ok(());
        };
        self.bind()?;
        // SAFETY: the caller guarantees the range.
        unsafe { cudarc::driver::result::memset_d8_async(dst, 0, bytes, dev.stream.cu_stream()) }
            .map_err(|e| self.dev_err("memset", e))
    }

    /// Waits for the stream (at once on a dry run).
    pub(crate) fn sync_stream(&self) -> Result<()> {
        let Some(dev) = &self.inner.dev else {
            return Ok(());
        };
        dev.stream
            .synchronize()
            .map_err(|e| self.dev_err("synchronize (a kernel may have failed)", e))
    }

    /// Workspace of at least `len` f32 on the backend's stream, returned as a device pointer.
    /// Valid for work enqueued on [`Cuda::stream`] until the next `scratch_f32` call (the buffer
    /// only grows; a replaced buffer is freed in stream order, after the work that used it).
    pub fn scratch_f32(&self, len: usize) -> Result<u64> {
        match (&self.inner.dev, &self.inner.dry) {
            (Some(dev), _) => self.scratch(&dev.scratch_f32, len * 4),
            (None, Some(dry)) => Ok(dry.alloc(len * 4)),
            (None, None) => unreachable!("a backend is a GPU or a dry run"),
        }
    }

    /// Like [`Cuda::scratch_f32`], for i32 (separate memory).
    pub fn scratch_i32(&self, len: usize) -> Result<u64> {
        match (&self.inner.dev, &self.inner.dry) {
            (Some(dev), _) => self.scratch(&dev.scratch_i32, len * 4),
            (None, Some(dry)) => Ok(dry.alloc(len * 4)),
            (None, None) => unreachable!("a backend is a GPU or a dry run"),
        }
    }

    fn scratch(&self, slot: &Mutex<Option<CudaSlice<u8>>>, bytes: usize) -> Result<u64> {
        let mut s = slot.lock().unwrap();
        if s.as_ref().is_none_or(|b| b.len() < bytes) {
            *s = None;
            let b = self
                .dev()
                .stream
                .alloc_zeros::<u8>(bytes.max(256))
                .map_err(|e| self.oom(bytes, e))?;
            *s = Some(b);
        }
        Ok(raw_ptr(s.as_ref().unwrap(), &self.dev().stream))
    }

    fn oom(&self, bytes: usize, e: cudarc::driver::DriverError) -> Error {
        Error::Device(format!(
            "cuda:{}: allocating {:.1} MiB: {e}",
            self.inner.ordinal,
            bytes as f64 / (1 << 20) as f64
        ))
    }

    pub(crate) fn alloc_buf<T: Elem>(&self, len: usize) -> Result<DBuf<T>> {
        let bytes = len * std::mem::size_of::<T>();
        if bytes == 0 {
            return Ok(DBuf {
                mem: None,
                ptr: 0,
                len,
                _t: PhantomData,
            });
        }
        if let Some(dry) = &self.inner.dry {
            return Ok(DBuf {
                mem: None,
                ptr: dry.alloc(bytes),
                len,
                _t: PhantomData,
            });
        }
        let stream = &self.dev().stream;
        let mem = stream
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| self.oom(bytes, e))?;
        let ptr = raw_ptr(&mem, stream);
        Ok(DBuf {
            mem: Some(mem),
            ptr,
            len,
            _t: PhantomData,
        })
    }

    /// A grid for a grid-stride loop over `work` items handled `per_block` at a time: enough
    /// blocks to fill the GPU, never more than the work needs.
    pub(crate) fn grid_for(&self, work: usize, per_block: usize) -> u32 {
        let need = work.div_ceil(per_block.max(1)).max(1);
        need.min(self.inner.sm_count as usize * 16) as u32
    }

    pub(crate) fn reduce_ptr(&self) -> u64 {
        self.inner.reduce_ptr
    }

    pub(crate) fn embed_plan(&self) -> std::sync::MutexGuard<'_, EmbedPlan> {
        self.inner.embed_plan.lock().unwrap()
    }

    pub(crate) fn dev_err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Device(format!("cuda:{}: {what}: {e}", self.inner.ordinal))
    }

    pub(crate) fn display_name(&self) -> &str {
        &self.inner.name
    }

    /// Mean milliseconds per call of `f`, timed with CUDA events on the backend's stream over
    /// `reps` calls after one warm-up call (the host only enqueues; the events time the GPU).
    pub fn time_ms(&self, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        let dev = self.inner.dev.as_ref().ok_or_else(|| {
            Error::Device("a dry-run backend has no GPU to time kernels on".into())
        })?;
        let ev = || {
            dev.ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| self.dev_err("creating an event", e))
        };
        let (start, end) = (ev()?, ev()?);
        f()?;
        start
            .record(&dev.stream)
            .map_err(|e| self.dev_err("recording an event", e))?;
        for _ in 0..reps.max(1) {
            f()?;
        }
        end.record(&dev.stream)
            .map_err(|e| self.dev_err("recording an event", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| self.dev_err("timing (a kernel may have failed)", e))?;
        Ok(ms as f64 / reps.max(1) as f64)
    }

    /// Keeps `reduce` alive for as long as `reduce_ptr` is used.
    #[allow(dead_code)]
    fn reduce_buf(&self) -> Option<&CudaSlice<f64>> {
        self.inner.dev.as_ref().map(|d| &d.reduce)
    }
}

impl DryRun {
    /// A fresh fake address range of `bytes` (256-aligned, like cudaMalloc).
    fn alloc(&self, bytes: usize) -> u64 {
        let bytes = (bytes.max(1) as u64).next_multiple_of(256);
        self.next.fetch_add(bytes, Ordering::Relaxed)
    }
}

/// The raw device address of a cudarc allocation.
pub(super) fn raw_ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    use cudarc::driver::DevicePtr;
    // Event tracking is off, so the guard returned with the pointer does nothing on drop.
    let (p, _guard) = s.device_ptr(stream);
    p
}
