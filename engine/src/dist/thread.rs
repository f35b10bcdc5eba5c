//! The CPU stand-in for NCCL: ranks are threads of one process that meet at a barrier and
//! exchange through shared slots, with NCCL's rules checked (same call, same lengths, in step).

use super::{
    bucket_in_piece, check_cover, check_len, check_part, piece_of, Collective, DeviceCollective,
};
use crate::backend::cpu::Cpu;
use crate::error::{Error, Result};
use std::sync::{Arc, Barrier, Mutex};

/// A collective call as the ranks must agree on it: its name and its sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Call {
    name: &'static str,
    sizes: [usize; 4],
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{:?}", self.name, self.sizes)
    }
}

/// State shared by the ranks of a [`ThreadGroup`]: one posting slot per rank (the call it
/// made and its data).
struct Shared {
    barrier: Barrier,
    slots: Vec<Mutex<(Call, Vec<f32>)>>,
}

/// A CPU stand-in for NCCL: ranks are threads of one process.
pub struct ThreadGroup;

impl ThreadGroup {
    /// One communicator per rank, each to be moved into its own thread. Every rank must take
    /// part in every collective (as with NCCL), or the others wait forever.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize) -> Vec<ThreadComm> {
        assert!(world > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            barrier: Barrier::new(world),
            slots: (0..world)
                .map(|_| Mutex::new((Call::default(), Vec::new())))
                .collect(),
        });
        (0..world)
            .map(|rank| ThreadComm {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }
}

/// One rank of a [`ThreadGroup`]. A collective posts this rank's call and data, waits for
/// every rank, reads what it needs, and waits again so no slot is overwritten while another
/// rank reads it. Sums run in rank order, so every rank gets the same bits on every run.
///
/// Where NCCL would hang or mix up data, ranks that make different calls at the same point
/// (another collective, other sizes, other bucket edges) all get an error naming both calls.
pub struct ThreadComm {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// Posts `call` and `data` and waits for every rank. `Ok` when every rank made the same
    /// call: read the slots, then [`ThreadComm::done`] either way.
    fn post(&self, call: Call, data: &[f32]) -> std::result::Result<(), (usize, Call)> {
        {
            let mut slot = self.shared.slots[self.rank].lock().expect("slot lock");
            slot.0 = call;
            slot.1.clear();
            slot.1.extend_from_slice(data);
        }
        self.shared.barrier.wait();
        match (0..self.world)
            .map(|r| (r, self.shared.slots[r].lock().expect("slot lock").0))
            .find(|(_, c)| *c != call)
        {
            None => Ok(()),
            Some(other) => Err(other),
        }
    }

    /// Waits until every rank has read, then names a mismatch `post` found.
    fn done(&self, call: Call, posted: std::result::Result<(), (usize, Call)>) -> Result<()> {
        self.shared.barrier.wait();
        posted.map_err(|(r, c)| {
            Error::Dist(format!(
                "collectives out of step: rank {} called {call} while rank {r} called {c}",
                self.rank
            ))
        })
    }

    /// The first `out.len()` values rank `r` posted, copied into `out`.
    fn read_slot(&self, r: usize, out: &mut [f32]) {
        let slot = self.shared.slots[r].lock().expect("slot lock");
        out.copy_from_slice(&slot.1[..out.len()]);
    }

    /// out[i] = Σ_r slot_r[off + i], summed from rank 0 up.
    fn sum_slots(&self, off: usize, out: &mut [f32]) {
        for (r, slot) in self.shared.slots.iter().enumerate() {
            let slot = slot.lock().expect("slot lock");
            let src = &slot.1[off..off + out.len()];
            if r == 0 {
                out.copy_from_slice(src);
            } else {
                out.iter_mut().zip(src).for_each(|(o, &x)| *o += x);
            }
        }
    }
}

fn call(name: &'static str, sizes: [usize; 4]) -> Call {
    Call { name, sizes }
}

impl Collective for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let c = call("all_reduce_sum", [buf.len(), 0, 0, 0]);
        let posted = self.post(c, buf);
        if posted.is_ok() {
            self.sum_slots(0, buf);
        }
        self.done(c, posted)
    }

    fn reduce_scatter_sum(&mut self, input: &[f32], out_shard: &mut [f32]) -> Result<()> {
        check_len(
            "reduce_scatter input",
            input.len(),
            self.world * out_shard.len(),
        )?;
        let c = call("reduce_scatter_sum", [input.len(), 0, 0, 0]);
        let posted = self.post(c, input);
        if posted.is_ok() {
            self.sum_slots(self.rank * out_shard.len(), out_shard);
        }
        self.done(c, posted)
    }

    fn all_gather(&mut self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        check_len("all_gather output", out.len(), self.world * shard.len())?;
        let c = call("all_gather", [shard.len(), 0, 0, 0]);
        let posted = self.post(c, shard);
        if posted.is_ok() {
            for (r, dst) in out.chunks_mut(shard.len().max(1)).enumerate() {
                self.read_slot(r, dst);
            }
        }
        self.done(c, posted)
    }

    fn barrier(&mut self) -> Result<()> {
        let c = call("barrier", [0; 4]);
        let posted = self.post(c, &[]);
        self.done(c, posted)
    }
}

/// The CPU backend's buffers are host memory: the collectives read other ranks' posted data.
impl DeviceCollective<Cpu> for ThreadComm {
    fn all_reduce_sum_buf(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)
    }
    fn reduce_scatter_v(&mut self, input: &[f32], out: &mut [f32], piece: usize) -> Result<()> {
        let (n, world, rank) = (input.len(), self.world, self.rank);
        check_cover("reduce_scatter_v", n, piece, world)?;
        let (off, len) = piece_of(n, piece, rank);
        check_len("reduce_scatter_v output", out.len(), len)?;
        let c = call("reduce_scatter_v", [n, piece, 0, 0]);
        let posted = self.post(c, input);
        if posted.is_ok() {
            self.sum_slots(off, out);
        }
        self.done(c, posted)
    }
    fn reduce_scatter_part(
        &mut self,
        part: &[f32],
        lo: usize,
        n: usize,
        out: &mut [f32],
        piece: usize,
    ) -> Result<()> {
        let (world, rank) = (self.world, self.rank);
        check_part(lo, part.len(), n, piece, world, rank, out.len())?;
        let c = call("reduce_scatter_part", [lo, part.len(), n, piece]);
        let (a, b) = bucket_in_piece(lo, lo + part.len(), n, piece, rank);
        let off = piece_of(n, piece, rank).0;
        // Summed in rank order, as the whole reduce-scatter: the same bits, bucket by bucket.
        let posted = self.post(c, part);
        if posted.is_ok() && a < b {
            self.sum_slots(a - lo, &mut out[a - off..b - off]);
        }
        self.done(c, posted)
    }
    fn wait_reduced(&mut self) -> Result<()> {
        Ok(())
    }
    fn all_gather_v(&mut self, buf: &mut [f32], piece: usize) -> Result<()> {
        let (n, world, rank) = (buf.len(), self.world, self.rank);
        check_cover("all_gather_v", n, piece, world)?;
        let (off, len) = piece_of(n, piece, rank);
        let c = call("all_gather_v", [n, piece, 0, 0]);
        let posted = self.post(c, &buf[off..off + len]);
        if posted.is_ok() {
            for r in (0..world).filter(|&r| r != rank) {
                let (o, l) = piece_of(n, piece, r);
                self.read_slot(r, &mut buf[o..o + l]);
            }
        }
        self.done(c, posted)
    }
}

/// Runs `f(comm)` on `world` threads and returns each rank's result in rank order.
#[cfg(test)]
pub(crate) fn on_ranks<T: Send>(world: usize, f: impl Fn(ThreadComm) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|c| s.spawn(|| f(c)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_match_a_serial_sum() {
        let (world, s) = (3, 5);
        let data = |r: usize| -> Vec<f32> {
            (0..world * s)
                .map(|i| (i as f32 * 0.37 + r as f32).sin())
                .collect()
        };
        let out = on_ranks(world, |mut c| {
            let r = c.rank();
            let mut all = data(r);
            c.all_reduce_sum(&mut all).unwrap();
            let mut shard = vec![0f32; s];
            c.reduce_scatter_sum(&data(r), &mut shard).unwrap();
            let mut gathered = vec![0f32; world * s];
            c.all_gather(&shard, &mut gathered).unwrap();
            c.barrier().unwrap();
            (all, gathered)
        });
        let want: Vec<f32> = (0..world * s)
            .map(|i| (1..world).fold(data(0)[i], |acc, r| acc + data(r)[i]))
            .collect();
        for (all, gathered) in &out {
            // Rank-order sums: the same bits as the serial loop, on every rank.
            assert_eq!(all, &want);
            // reduce-scatter then all-gather is an all-reduce.
            assert_eq!(gathered, &want);
        }
    }

    #[test]
    fn collectives_are_deterministic() {
        let run = || {
            on_ranks(4, |mut c| {
                let mut x: Vec<f32> = (0..1000)
                    .map(|i| 1.0 / (1 + i + 7 * c.rank()) as f32)
                    .collect();
                c.all_reduce_sum(&mut x).unwrap();
                x
            })
        };
        let a = run();
        assert!(a.iter().all(|x| x == &a[0]));
        assert_eq!(a, run());
    }

    /// The uneven collectives on 3 ranks over 10 elements in pieces of 4: the last rank's
    /// piece is short, and a piece that cannot cover the vector is refused.
    #[test]
    fn uneven_pieces_reduce_and_gather_in_place() {
        let (world, n, piece) = (3, 10, 4);
        let out = on_ranks(world, |mut c| {
            let r = c.rank();
            let input: Vec<f32> = (0..n).map(|i| (i * 10 + r) as f32).collect();
            let (off, len) = piece_of(n, piece, r);
            let mut mine = vec![0f32; len];
            c.reduce_scatter_v(&input, &mut mine, piece).unwrap();
            let mut buf = vec![-1f32; n];
            buf[off..off + len].copy_from_slice(&mine);
            c.all_gather_v(&mut buf, piece).unwrap();
            let short = c.reduce_scatter_v(&input, &mut mine, 3).is_err();
            (buf, short)
        });
        let want: Vec<f32> = (0..n).map(|i| (i * 30 + 3) as f32).collect();
        for (buf, short) in out {
            assert_eq!(buf, want);
            assert!(short);
        }
    }

    /// Buckets issued tail first, of any size (one element, across pieces, inside one), give
    /// every rank the same bits as one reduce-scatter; a bucket past the end is refused on
    /// every rank (before any rank waits for the others).
    #[test]
    fn buckets_reduce_to_the_same_bits_as_one_reduce_scatter() {
        let n: usize = 37;
        let cuts = [37, 36, 30, 29, 12, 11, 10, 0];
        for world in 1..=4 {
            let piece = n.div_ceil(world);
            for (r, (whole, parts, past)) in on_ranks(world, |mut c| {
                let r = c.rank();
                let input: Vec<f32> = (0..n)
                    .map(|i| ((i * 31 + r * 7) % 13) as f32 * 0.1 + 1e-3 * r as f32)
                    .collect();
                let len = piece_of(n, piece, r).1;
                let mut whole = vec![0f32; len];
                c.reduce_scatter_v(&input, &mut whole, piece).unwrap();
                // NaN until written: a bucket that missed an element shows.
                let mut parts = vec![f32::NAN; len];
                for w in cuts.windows(2) {
                    let (hi, lo) = (w[0], w[1]);
                    c.reduce_scatter_part(&input[lo..hi], lo, n, &mut parts, piece)
                        .unwrap();
                }
                c.wait_reduced().unwrap();
                let past = c.reduce_scatter_part(&input[30..], 31, n, &mut parts, piece);
                (whole, parts, past.is_err())
            })
            .into_iter()
            .enumerate()
            {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&parts), bits(&whole), "world {world}, rank {r}");
                assert!(past, "world {world}: a bucket past the end was accepted");
            }
        }
    }

    /// Ranks that make different calls at the same point (NCCL would hang or mix data) all
    /// get an error naming both calls, and the group goes on working after it.
    #[test]
    fn calls_out_of_step_fail_on_every_rank() {
        let out = on_ranks(2, |mut c| {
            let input = [1f32; 10];
            let mut mine = [0f32; 5];
            let e = if c.rank() == 0 {
                c.reduce_scatter_v(&input, &mut mine, 5)
            } else {
                c.reduce_scatter_part(&input[4..], 4, 10, &mut mine, 5)
            };
            let mut x = [c.rank() as f32 + 1.0];
            c.all_reduce_sum(&mut x).unwrap();
            (e.unwrap_err().to_string(), x[0])
        });
        for (r, (e, x)) in out.into_iter().enumerate() {
            let other = if r == 0 {
                "reduce_scatter_part[4, 6, 10, 5]"
            } else {
                "reduce_scatter_v[10, 5, 0, 0]"
            };
            assert!(
                e.contains("out of step") && e.contains(other),
                "rank {r}: {e}"
            );
            assert_eq!(x, 3.0);
        }
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut c = ThreadGroup::new(1).pop().unwrap();
        assert!(c.reduce_scatter_sum(&[1.0; 3], &mut [0.0; 2]).is_err());
        assert!(c.all_gather(&[1.0; 2], &mut [0.0; 3]).is_err());
    }
}
