//! Helpers for the tests that run kernels (the engine's or hand-written PTX): device buffers,
//! parameter packing, launch, and the module header of hand-written kernels.
#![allow(dead_code)]

use gpu_sim::mem::Memory;
use gpu_sim::ptx::{launch, Checks, Kernel, KernelFault, LaunchParams, LaunchStats, Module};
use half::bf16;

/// The engine's PTX of `module`, or None (with a printed line) when it was built without nvcc.
pub fn engine_ptx(module: &str) -> Option<&'static str> {
    let p = engine::backend::cuda::module_ptx(module);
    if p.is_none() {
        println!("skipped: the engine was built without PTX (set NVCC and rebuild)");
    }
    p
}

pub fn kernel(module: &str, name: &str) -> Option<Kernel> {
    let ptx = engine_ptx(module)?;
    let m = Module::parse(ptx).unwrap_or_else(|e| panic!("{module}: {e}"));
    assert!(m.globals().is_empty() || module == "rope");
    Some(
        m.kernel(name)
            .unwrap_or_else(|| panic!("{module} has no kernel {name}")),
    )
}

/// A module with its globals allocated, initialised and bound.
pub fn kernel_bound(dev: &Dev, module: &str, name: &str) -> Option<Kernel> {
    let ptx = engine_ptx(module)?;
    let mut m = Module::parse(ptx).unwrap_or_else(|e| panic!("{module}: {e}"));
    let addrs: Vec<u64> = m
        .globals()
        .iter()
        .map(|g| {
            let a = dev.mem.alloc(g.size.max(1)).unwrap();
            dev.mem.write(a, &g.init).unwrap();
            a
        })
        .collect();
    m.bind_globals(&addrs);
    Some(m.kernel(name).unwrap())
}

pub struct Dev {
    pub mem: Memory,
}

impl Default for Dev {
    fn default() -> Self {
        Dev::new()
    }
}

impl Dev {
    pub fn new() -> Dev {
        Dev {
            mem: Memory::new(0, 1 << 34),
        }
    }
    pub fn bytes(&self, b: &[u8]) -> u64 {
        let a = self.mem.alloc(b.len().max(1) as u64).unwrap();
        self.mem.write(a, b).unwrap();
        a
    }
    pub fn bf16(&self, x: &[f32]) -> u64 {
        let b: Vec<u8> = x
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        self.bytes(&b)
    }
    pub fn f32(&self, x: &[f32]) -> u64 {
        let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.bytes(&b)
    }
    pub fn i32(&self, x: &[i32]) -> u64 {
        let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.bytes(&b)
    }
    /// Fresh (NaN-filled) memory.
    pub fn alloc(&self, bytes: usize) -> u64 {
        self.mem.alloc(bytes.max(1) as u64).unwrap()
    }
    pub fn zeros(&self, bytes: usize) -> u64 {
        self.bytes(&vec![0u8; bytes])
    }
    pub fn read_bf16(&self, a: u64, n: usize) -> Vec<f32> {
        let mut b = vec![0u8; n * 2];
        self.mem.read(a, &mut b).unwrap();
        b.chunks(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect()
    }
    pub fn read_f32(&self, a: u64, n: usize) -> Vec<f32> {
        let mut b = vec![0u8; n * 4];
        self.mem.read(a, &mut b).unwrap();
        b.chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
    pub fn read_f64(&self, a: u64, n: usize) -> Vec<f64> {
        let mut b = vec![0u8; n * 8];
        self.mem.read(a, &mut b).unwrap();
        b.chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[allow(clippy::result_large_err)]
    /// Launches with each argument's bits written in the parameter's size at its offset.
    pub fn launch(
        &self,
        k: &Kernel,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        args: &[u64],
        racecheck: bool,
    ) -> Result<LaunchStats, KernelFault> {
        assert_eq!(args.len(), k.params().len(), "{}: argument count", k.name());
        let mut buf = vec![0u8; k.param_bytes()];
        for (p, a) in k.params().iter().zip(args) {
            let o = p.offset as usize;
            buf[o..o + p.size as usize].copy_from_slice(&a.to_le_bytes()[..p.size as usize]);
        }
        let view = self.mem.view();
        launch(
            k,
            &LaunchParams {
                grid,
                block,
                dyn_smem: smem,
                params: &buf,
            },
            &view,
            &Checks { racecheck },
        )
    }
}

pub fn f(x: f32) -> u64 {
    x.to_bits() as u64
}

/// Values rounded to bf16 and back (what a bf16 buffer holds).
pub fn bf(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| bf16::from_f32(*v).to_f32()).collect()
}

/// A deterministic pseudo-random sequence in [-1, 1).
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Max abs and max relative (to max(|ref|, floor)) error.
pub fn errs(got: &[f32], want: &[f32], floor: f32) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let mut ma = 0f32;
    let mut mr = 0f32;
    for (g, w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite output {g} (want {w})");
        let d = (g - w).abs();
        ma = ma.max(d);
        mr = mr.max(d / w.abs().max(floor));
    }
    (ma, mr)
}

/// The header every hand-written test module starts with.
pub const HEAD: &str = ".version 9.0\n.target sm_80\n.address_size 64\n";

/// A hand-written module: `body` after [`HEAD`].
pub fn module(body: &str) -> Module {
    Module::parse(&format!("{HEAD}{body}")).unwrap_or_else(|e| panic!("{e}"))
}

/// The 1-based line of the first line of the module text containing `needle`, header counted.
pub fn line_of(body: &str, needle: &str) -> usize {
    let text = format!("{HEAD}{body}");
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

/// `n` words at `a` as raw bits.
pub fn read_u32(dev: &Dev, a: u64, n: usize) -> Vec<u32> {
    dev.read_f32(a, n).iter().map(|x| x.to_bits()).collect()
}
