//! How the ranks of a job meet before NCCL can: rank 0 makes a blob (the 128-byte NCCL unique
//! id) and every other rank must receive it. Over TCP (rank 0 listens on `MASTER_PORT`, the
//! others connect to `MASTER_ADDR:MASTER_PORT`) or through a file on a shared filesystem.
//!
//! Both ways are also a barrier: rank 0 returns once every rank has the blob, and fails, naming
//! the missing ranks, if some never arrive within the timeout.

use super::env::parse_port;
use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The default time to wait for the other ranks (model loading on slow ranks included).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

const MAGIC: &[u8; 4] = b"L2RV";
const VERSION: u32 = 1;
/// Larger blobs are refused: the only one we send is 128 bytes.
const MAX_BLOB: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// One process: nothing to exchange.
    Single,
    /// Rank 0 listens on `port` (all interfaces); the others connect to `host:port`.
    Tcp { host: String, port: u16 },
    /// Rank 0 writes the file atomically; the others poll for it.
    File(PathBuf),
}

impl Rendezvous {
    /// `file:PATH`, `tcp://HOST:PORT` or `HOST:PORT` (`--rendezvous`).
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(p) = spec.strip_prefix("file:") {
            if p.is_empty() {
                return Err(Error::Dist("--rendezvous file: needs a path".into()));
            }
            return Ok(Rendezvous::File(PathBuf::from(p)));
        }
        let hp = spec.strip_prefix("tcp://").unwrap_or(spec);
        match hp.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() => Ok(Rendezvous::Tcp {
                host: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port: parse_port("--rendezvous port", port)?,
            }),
            _ => Err(Error::Dist(format!(
                "--rendezvous {spec:?}: expected file:PATH, tcp://HOST:PORT or HOST:PORT"
            ))),
        }
    }

    /// Hands rank 0's `blob` to every rank and returns it (rank 0 passes `Some`, the others
    /// `None`). Every rank of a `world`-rank job must call this with the same `self`.
    pub fn share(
        &self,
        rank: usize,
        world: usize,
        blob: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        if rank >= world {
            return Err(Error::Dist(format!(
                "rank {rank} is not below world {world}"
            )));
        }
        let root_blob = || {
            blob.map(<[u8]>::to_vec)
                .ok_or_else(|| Error::Dist("rendezvous: rank 0 must provide the blob".into()))
        };
        match self {
            Rendezvous::Single if world == 1 => root_blob(),
            Rendezvous::Single => Err(Error::Dist(format!(
                "a world of {world} ranks needs a rendezvous (MASTER_ADDR or --rendezvous)"
            ))),
            Rendezvous::Tcp { port, .. } if rank == 0 => {
                let b = root_blob()?;
                TcpServer::bind(*port)?.serve(world, &b, timeout)?;
                Ok(b)
            }
            Rendezvous::Tcp { host, port } => tcp_fetch(host, *port, rank, world, timeout),
            Rendezvous::File(path) if rank == 0 => {
                let b = root_blob()?;
                file_publish(path, world, &b, timeout)?;
                Ok(b)
            }
            Rendezvous::File(path) => file_fetch(path, rank, world, timeout),
        }
    }
}

fn dist(msg: String) -> Error {
    Error::Dist(msg)
}

/// Rank 0's side of the TCP rendezvous.
pub struct TcpServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl TcpServer {
    /// Listens on `port` on every interface: MASTER_ADDR is how the others reach rank 0, and on
    /// many clusters a node's own host name resolves to a loopback alias, so binding to it would
    /// shut the other nodes out (torch's TCPStore binds the same way). Port 0 picks a free one.
    pub fn bind(port: u16) -> Result<Self> {
        // IPv4 first; [::] only for hosts without IPv4.
        let listener = TcpListener::bind(("0.0.0.0", port))
            .or_else(|e| TcpListener::bind(("::", port)).map_err(|_| e))
            .map_err(|e| {
                dist(format!(
                    "rendezvous: rank 0 cannot listen on port {port}: {e} (another job on that \
                     port? pass --rendezvous HOST:PORT with a free port)"
                ))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| dist(format!("rendezvous: port {port}: {e}")))?;
        Ok(TcpServer { listener, addr })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits for ranks 1..world, then sends each the blob. A rank that says a different world
    /// size, an out-of-range or duplicate rank, or a timeout is an error here, and every rank
    /// already connected is told why.
    pub fn serve(self, world: usize, blob: &[u8], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<(TcpStream, SocketAddr)>> = (0..world).map(|_| None).collect();
        let res = self.gather(world, &mut peers, deadline, timeout);
        let (status, payload) = match &res {
            Ok(()) => (0u32, blob.to_vec()),
            Err(e) => (1, format!("rank 0 gave up: {e}").into_bytes()),
        };
        for (r, peer) in peers.iter_mut().enumerate() {
            if let Some((s, from)) = peer {
                let sent = write_frame(s, status, &payload);
                if res.is_ok() {
                    sent.map_err(|e| {
                        dist(format!(
                            "rendezvous: sending the id to rank {r} at {from}: {e}"
                        ))
                    })?;
                }
            }
        }
        res
    }

    fn gather(
        &self,
        world: usize,
        peers: &mut [Option<(TcpStream, SocketAddr)>],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<()> {
        let here = self.addr;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| dist(format!("rendezvous on {here}: {e}")))?;
        let mut have = 1;
        while have < world {
            let (mut s, from) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (1..world).filter(|&r| peers[r].is_none()).collect();
                        return Err(dist(format!(
                            "rendezvous on port {}: after {:.1} s, {} of {world} ranks arrived; \
                             missing ranks {missing:?} (not started, or MASTER_ADDR/MASTER_PORT \
                             wrong on them)",
                            here.port(),
                            timeout.as_secs_f64(),
                            have,
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(dist(format!("rendezvous on {here}: accept: {e}"))),
            };
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            let hello = s
                .set_nonblocking(false)
                .and_then(|_| s.set_read_timeout(Some(left)))
                .and_then(|_| read_hello(&mut s));
            // Something else that connected (a port scanner, a health check) is ignored.
            let Ok(Some((r, w))) = hello else { continue };
            let bad = if w != world {
                Some(format!(
                    "rank {r} at {from} was launched with a world of {w} ranks, rank 0 with {world}"
                ))
            } else if r == 0 || r >= world {
                Some(format!(
                    "a process at {from} says it is rank {r}; expected 1..{}",
                    world - 1
                ))
            } else {
                peers[r].as_ref().map(|(_, prev)| {
                    format!(
                        "rank {r} connected twice (from {prev} and {from}): two processes \
                         have the same rank"
                    )
                })
            };
            if let Some(msg) = bad {
                let _ = write_frame(&mut s, 1, msg.as_bytes());
                return Err(dist(format!("rendezvous: {msg}")));
            }
            peers[r] = Some((s, from));
            have += 1;
        }
        Ok(())
    }
}

fn read_hello(s: &mut TcpStream) -> std::io::Result<Option<(usize, usize)>> {
    let mut b = [0u8; 24];
    s.read_exact(&mut b)?;
    if &b[..4] != MAGIC || u32::from_le_bytes(b[4..8].try_into().unwrap()) != VERSION {
        return Ok(None);
    }
    let r = u64::from_le_bytes(b[8..16].try_into().unwrap()) as usize;
    let w = u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize;
    Ok(Some((r, w)))
}

fn write_frame(s: &mut TcpStream, status: u32, payload: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(16 + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&status.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    s.write_all(&out)?;
    s.flush()
}

/// A non-zero rank's side: connects to rank 0 at `host:port`, retrying (rank 0 may still be
/// starting) until `timeout`, and returns the blob.
pub fn tcp_fetch(
    host: &str,
    port: u16,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let what = format!("rank 0 at {host}:{port} (MASTER_ADDR:MASTER_PORT)");
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    let mut last: String;
    let mut s = loop {
        match connect_once(host, port, deadline) {
            Ok(s) => break s,
            Err(e) => last = e,
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(dist(format!(
                "rendezvous: could not reach {what} within {:.1} s (last error: {last}); is \
                 rank 0 running, and are MASTER_ADDR/MASTER_PORT the same on every rank?",
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_secs(1));
    };
    let io = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            dist(format!(
                "rendezvous: {what} accepted rank {rank} but sent no id within {:.1} s (some \
                 other rank never arrived?)",
                timeout.as_secs_f64()
            ))
        } else {
            dist(format!("rendezvous: talking to {what}: {e}"))
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    s.set_read_timeout(Some(left)).map_err(io)?;
    let mut hello = Vec::with_capacity(24);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&(rank as u64).to_le_bytes());
    hello.extend_from_slice(&(world as u64).to_le_bytes());
    s.write_all(&hello).map_err(io)?;
    let mut head = [0u8; 16];
    s.read_exact(&mut head).map_err(io)?;
    if &head[..4] != MAGIC {
        return Err(dist(format!(
            "rendezvous: {what} is not a llama2 rendezvous (another service on that port?)"
        )));
    }
    let status = u32::from_le_bytes(head[4..8].try_into().unwrap());
    let len = u64::from_le_bytes(head[8..16].try_into().unwrap());
    if len > MAX_BLOB {
        return Err(dist(format!("rendezvous: {what} sent a {len}-byte reply")));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).map_err(io)?;
    if status != 0 {
        return Err(dist(format!(
            "rendezvous: {what}: {}",
            String::from_utf8_lossy(&payload)
        )));
    }
    Ok(payload)
}

fn connect_once(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, String> {
    // Resolved on every attempt: a node's name may appear in DNS after the job starts.
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {host}: {e}"))?
        .collect();
    let mut last = format!("{host} resolves to no address");
    for a in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        let t = left.clamp(Duration::from_millis(10), Duration::from_secs(2));
        match TcpStream::connect_timeout(&a, t) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    Err(last)
}

/// `path` + `suffix` (`job.id` → `job.id.rank-3`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Rank 0's side of the file rendezvous: writes `path` atomically (temporary file, fsync,
/// rename), waits for every rank's acknowledgement file (`path.rank-R`), then removes them all
/// so the path can be reused. An existing `path` is refused: it is left by an earlier launch,
/// and its stale id would send the other ranks to a rank 0 that is gone.
pub fn file_publish(path: &Path, world: usize, blob: &[u8], timeout: Duration) -> Result<()> {
    if path.exists() {
        return Err(Error::file(
            path,
            "rendezvous file exists, left by an earlier launch: remove it (or use a fresh path \
             per launch, e.g. with the job id in it)",
        ));
    }
    let mut bytes = Vec::with_capacity(24 + blob.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(world as u64).to_le_bytes());
    bytes.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    bytes.extend_from_slice(blob);
    crate::checkpoint::write_file_atomic(path, &bytes)?;
    let deadline = Instant::now() + timeout;
    let ack = |r: usize| sibling(path, &format!(".rank-{r}"));
    loop {
        let missing: Vec<usize> = (1..world).filter(|&r| !ack(r).exists()).collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            // Leave the file: late ranks may still read it; the next launch reports it.
            return Err(Error::file(
                path,
                format!(
                    "rendezvous: after {:.1} s, {} of {world} ranks have read the id; missing \
                     ranks {missing:?} (not started, or given another --rendezvous path?)",
                    timeout.as_secs_f64(),
                    world - missing.len(),
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for r in 1..world {
        let _ = std::fs::remove_file(ack(r));
    }
    std::fs::remove_file(path).map_err(|e| Error::io(path, e))
}

/// A non-zero rank's side: polls for `path` until `timeout`, reads the blob, and acknowledges
/// it with `path.rank-R`.
pub fn file_fetch(path: &Path, rank: usize, world: usize, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let bytes = loop {
        // Rank 0 renames a complete file into place, so any file we can open is whole.
        match std::fs::read(path) {
            Ok(b) => break b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(path, e)),
        }
        if Instant::now() >= deadline {
            return Err(Error::file(
                path,
                format!(
                    "rendezvous: rank {rank} waited {:.1} s and rank 0 never wrote this file \
                     (not started, or given another path?)",
                    timeout.as_secs_f64()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let bad = |m: &str| Error::file(path, format!("not a llama2 rendezvous file: {m}"));
    if bytes.len() < 24 || &bytes[..4] != MAGIC {
        return Err(bad("bad header"));
    }
    if u32::from_le_bytes(bytes[4..8].try_into().unwrap()) != VERSION {
        return Err(bad("unknown version"));
    }
    let w = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    if bytes.len() != 24 + len {
        return Err(bad("length does not match its header"));
    }
    if w != world {
        return Err(Error::file(
            path,
            format!("rank 0 wrote it for a world of {w} ranks, but rank {rank} has {world}"),
        ));
    }
    crate::checkpoint::write_file_atomic(&sibling(path, &format!(".rank-{rank}")), b"")?;
    Ok(bytes[24..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            Rendezvous::parse("file:/shared/x.id").unwrap(),
            Rendezvous::File("/shared/x.id".into())
        );
        assert_eq!(
            Rendezvous::parse("tcp://node0:29500").unwrap(),
            Rendezvous::Tcp {
                host: "node0".into(),
                port: 29500
            }
        );
        assert_eq!(
            Rendezvous::parse("[::1]:7").unwrap(),
            Rendezvous::Tcp {
                host: "::1".into(),
                port: 7
            }
        );
        for bad in ["node0", "file:", ":29500", "node0:http", "node0:0"] {
            assert!(Rendezvous::parse(bad).is_err(), "{bad}");
        }
    }

    /// A port that was free a moment ago (the listener is dropped; reuse is immediate).
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn blob() -> Vec<u8> {
        (0..128).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// Runs `share` on `world` threads, the non-zero ranks first and rank 0 `delay` later (so
    /// the others must retry), and returns each rank's result in rank order.
    fn share_all(rdv: &Rendezvous, world: usize, delay: Duration) -> Vec<Result<Vec<u8>>> {
        let t = Duration::from_secs(20);
        std::thread::scope(|s| {
            let others: Vec<_> = (1..world)
                .map(|r| s.spawn(move || rdv.share(r, world, None, t)))
                .collect();
            std::thread::sleep(delay);
            let b = blob();
            let mut out = vec![rdv.share(0, world, Some(&b), t)];
            out.extend(others.into_iter().map(|h| h.join().unwrap()));
            out
        })
    }

    #[test]
    fn tcp_three_ranks_get_rank_0s_blob() {
        let rdv = Rendezvous::Tcp {
            host: "127.0.0.1".into(),
            port: free_port(),
        };
        for (r, got) in share_all(&rdv, 3, Duration::from_millis(150))
            .into_iter()
            .enumerate()
        {
            assert_eq!(got.unwrap(), blob(), "rank {r}");
        }
    }

    #[test]
    fn file_three_ranks_get_rank_0s_blob_and_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.id");
        let rdv = Rendezvous::File(path.clone());
        for (r, got) in share_all(&rdv, 3, Duration::from_millis(100))
            .into_iter()
            .enumerate()
        {
            assert_eq!(got.unwrap(), blob(), "rank {r}");
        }
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        // So the same path works for the next launch.
        for got in share_all(&rdv, 2, Duration::ZERO) {
            assert_eq!(got.unwrap(), blob());
        }
    }

    #[test]
    fn tcp_timeout_names_the_address() {
        let port = free_port();
        let t0 = Instant::now();
        let e = tcp_fetch("127.0.0.1", port, 1, 2, Duration::from_millis(300)).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains(&format!("127.0.0.1:{port}")) && m.contains("within 0.3 s"),
            "{m}"
        );
        assert!(m.contains("MASTER_ADDR"), "{m}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn tcp_rank_0_names_the_missing_ranks_and_tells_the_others() {
        let server = TcpServer::bind(0).unwrap();
        let port = server.port();
        let t = Duration::from_millis(500);
        let (srv, r1) = std::thread::scope(|s| {
            let h = s.spawn(move || server.serve(3, &blob(), t));
            let r1 = tcp_fetch("127.0.0.1", port, 1, 3, Duration::from_secs(10));
            (h.join().unwrap(), r1)
        });
        let m = srv.unwrap_err().to_string();
        assert!(
            m.contains("missing ranks [2]") && m.contains("2 of 3"),
            "{m}"
        );
        let m1 = r1.unwrap_err().to_string();
        assert!(
            m1.contains("rank 0 gave up") && m1.contains("missing ranks [2]"),
            "{m1}"
        );
    }

    #[test]
    fn tcp_world_size_mismatch_fails_on_both_sides() {
        let server = TcpServer::bind(0).unwrap();
        let port = server.port();
        let t = Duration::from_secs(10);
        let (srv, r1) = std::thread::scope(|s| {
            let h = s.spawn(move || server.serve(3, &blob(), t));
            let r1 = tcp_fetch("127.0.0.1", port, 1, 2, t);
            (h.join().unwrap(), r1)
        });
        let m = srv.unwrap_err().to_string();
        assert!(m.contains("world of 2 ranks, rank 0 with 3"), "{m}");
        assert!(r1.unwrap_err().to_string().contains("world of 2 ranks"));
    }

    #[test]
    fn file_timeouts_and_stale_files_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.id");
        let t = Duration::from_millis(200);
        let m = file_fetch(&path, 1, 2, t).unwrap_err().to_string();
        assert!(m.contains("job.id") && m.contains("never wrote"), "{m}");
        let m = file_publish(&path, 3, &blob(), t).unwrap_err().to_string();
        assert!(
            m.contains("job.id") && m.contains("missing ranks [1, 2]"),
            "{m}"
        );
        // The file stays (a late rank may still read it) and the next launch refuses it.
        let m = file_publish(&path, 3, &blob(), t).unwrap_err().to_string();
        assert!(m.contains("job.id") && m.contains("earlier launch"), "{m}");
        let m = file_fetch(&path, 1, 2, t).unwrap_err().to_string();
        assert!(m.contains("world of 3 ranks, but rank 1 has 2"), "{m}");
    }

    #[test]
    fn single_process_gets_its_own_blob() {
        let b = Rendezvous::Single
            .share(0, 1, Some(b"id"), Duration::from_secs(1))
            .unwrap();
        assert_eq!(b, b"id");
        assert!(Rendezvous::Single
            .share(0, 2, Some(b"id"), Duration::from_secs(1))
            .is_err());
    }
}
