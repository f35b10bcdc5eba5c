//! The launch environment: which rank this process is, how many ranks there are, which GPU it
//! drives and where rank 0 listens, read from the variables `torchrun` or `mpirun` set, so a job
//! launches with the tools clusters already use.

use super::rendezvous::Rendezvous;
use crate::error::{Error, Result};
use std::collections::HashMap;

/// Which launcher's variables gave the rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one process.
    Single,
    /// `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (torchrun, torch.distributed.launch, most launchers).
    Torchrun,
    /// `OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}` (Open MPI's mpirun).
    OpenMpi,
    /// `PMI_RANK`, `PMI_SIZE` (MPICH/Intel MPI hydra, Slurm's srun with PMI); the local rank
    /// from `MPI_LOCALRANKID` or `SLURM_LOCALID`.
    Pmi,
}

/// This process's place in a data-parallel job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// The index of this process on its node: the GPU it drives (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// `MASTER_ADDR` and `MASTER_PORT`, when set.
    pub master: Option<(String, u16)>,
    /// `TORCHELASTIC_USE_AGENT_STORE=True`: torchrun's agent on node rank 0 already listens on
    /// MASTER_PORT (its own key-value store), so our rank 0 takes MASTER_PORT + 1.
    pub agent_store: bool,
    pub launcher: Launcher,
}

/// (launcher, rank variable, size variable, local-rank variables in order of preference,
/// local-size variable).
type Source = (
    Launcher,
    &'static str,
    &'static str,
    &'static [&'static str],
    Option<&'static str>,
);

/// In order of precedence: torchrun started under mpirun/srun (one agent per node) sees both
/// sets, and its own describe the processes it spawned.
const SOURCES: [Source; 3] = [
    (
        Launcher::Torchrun,
        "RANK",
        "WORLD_SIZE",
        &["LOCAL_RANK"],
        Some("LOCAL_WORLD_SIZE"),
    ),
    (
        Launcher::OpenMpi,
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        &["OMPI_COMM_WORLD_LOCAL_RANK"],
        Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
    ),
    (
        Launcher::Pmi,
        "PMI_RANK",
        "PMI_SIZE",
        &["MPI_LOCALRANKID", "SLURM_LOCALID"],
        None,
    ),
];

impl DistEnv {
    /// One process, no launcher.
    pub fn single() -> Self {
        DistEnv {
            rank: 0,
            world: 1,
            local_rank: 0,
            master: None,
            agent_store: false,
            launcher: Launcher::Single,
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads an explicit map (tests, or a launcher that passes variables some other way).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self> {
        Self::from_lookup(|k| vars.get(k).cloned())
    }

    /// Reads variables through `get`. An empty value counts as unset (`export RANK=` is how
    /// shells unset); a malformed or inconsistent one is an error naming the variable.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let uint = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.parse::<usize>().map_err(|_| {
                        Error::Dist(format!("{k}={v:?} is not a non-negative integer"))
                    })
                })
                .transpose()
        };
        let master = match (get("MASTER_ADDR"), get("MASTER_PORT")) {
            (None, None) => None,
            (Some(addr), Some(p)) => Some((addr, parse_port("MASTER_PORT", &p)?)),
            (Some(addr), None) => {
                return Err(Error::Dist(format!(
                    "MASTER_ADDR={addr:?} is set but MASTER_PORT is not (torchrun sets both; \
                     e.g. MASTER_PORT=29500)"
                )))
            }
            (None, Some(p)) => {
                return Err(Error::Dist(format!(
                    "MASTER_PORT={p:?} is set but MASTER_ADDR is not: set MASTER_ADDR to rank \
                     0's host name or address"
                )))
            }
        };
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
        for &(launcher, rank_var, size_var, local_vars, local_size_var) in &SOURCES {
            let (rank, world) = match (uint(rank_var)?, uint(size_var)?) {
                (None, None) => continue,
                (Some(r), Some(w)) => (r, w),
                (Some(_), None) => {
                    return Err(Error::Dist(format!(
                        "{rank_var} is set but {size_var} is not: both are needed"
                    )))
                }
                (None, Some(_)) => {
                    return Err(Error::Dist(format!(
                        "{size_var} is set but {rank_var} is not: both are needed"
                    )))
                }
            };
            if world == 0 {
                return Err(Error::Dist(format!(
                    "{size_var}=0: a job needs at least one rank"
                )));
            }
            if rank >= world {
                return Err(Error::Dist(format!(
                    "{rank_var}={rank} is not below {size_var}={world} (ranks are 0..{})",
                    world - 1
                )));
            }
            let mut local = None;
            for &v in local_vars {
                if let Some(l) = uint(v)? {
                    local = Some((v, l));
                    break;
                }
            }
            let local_rank = match local {
                Some((v, l)) => {
                    if l > rank {
                        return Err(Error::Dist(format!(
                            "{v}={l} is above {rank_var}={rank}: a process's index on its node \
                             cannot exceed its global rank"
                        )));
                    }
                    if let Some(ls_var) = local_size_var {
                        if let Some(ls) = uint(ls_var)? {
                            if l >= ls {
                                return Err(Error::Dist(format!(
                                    "{v}={l} is not below {ls_var}={ls}"
                                )));
                            }
                        }
                    }
                    l
                }
                // One process: it is GPU 0 of its node whatever launched it.
                None if world == 1 => 0,
                None => {
                    return Err(Error::Dist(format!(
                        "{rank_var} and {size_var} are set but {} is not: it picks this \
                         process's GPU on its node",
                        local_vars.join(" / ")
                    )))
                }
            };
            return Ok(DistEnv {
                rank,
                world,
                local_rank,
                master,
                agent_store,
                launcher,
            });
        }
        Ok(DistEnv {
            master,
            agent_store,
            ..DistEnv::single()
        })
    }

    pub fn is_distributed(&self) -> bool {
        self.world > 1
    }

    /// How the ranks meet: `spec` is `--rendezvous` (`file:PATH`, `tcp://HOST:PORT` or
    /// `HOST:PORT`); without it, TCP on `MASTER_ADDR:MASTER_PORT` (`MASTER_PORT + 1` under
    /// torchrun's agent store, see [`DistEnv::agent_store`]). One process needs none.
    pub fn rendezvous(&self, spec: Option<&str>) -> Result<Rendezvous> {
        if let Some(s) = spec {
            return Rendezvous::parse(s);
        }
        if self.world == 1 {
            return Ok(Rendezvous::Single);
        }
        match &self.master {
            Some((host, port)) if self.agent_store => match port.checked_add(1) {
                Some(p) => Ok(Rendezvous::Tcp {
                    host: host.clone(),
                    port: p,
                }),
                None => Err(Error::Dist(format!(
                    "MASTER_PORT={port} is torchrun's store and {port} + 1 is no port: pick a \
                     lower --master-port, or pass --rendezvous HOST:PORT"
                ))),
            },
            Some((host, port)) => Ok(Rendezvous::Tcp {
                host: host.clone(),
                port: *port,
            }),
            None => Err(Error::Dist(format!(
                "MASTER_ADDR is not set but the world has {} ranks: set MASTER_ADDR and \
                 MASTER_PORT to where rank 0 listens (torchrun sets them), or pass \
                 --rendezvous file:PATH on a shared filesystem",
                self.world
            ))),
        }
    }
}

pub(super) fn parse_port(what: &str, p: &str) -> Result<u16> {
    match p.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(Error::Dist(format!(
            "{what}={p:?} is not a TCP port (1-65535)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_map(&map)
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        env(pairs).unwrap_err().to_string()
    }

    #[test]
    fn no_variables_is_one_process() {
        let e = env(&[]).unwrap();
        assert_eq!(e, DistEnv::single());
        assert!(!e.is_distributed());
        assert_eq!(e.rendezvous(None).unwrap(), Rendezvous::Single);
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("RANK", "9"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "8"),
            ("MASTER_ADDR", "node0.cluster"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 9,
                world: 16,
                local_rank: 1,
                master: Some(("node0.cluster".into(), 29500)),
                agent_store: false,
                launcher: Launcher::Torchrun,
            }
        );
        assert_eq!(
            e.rendezvous(None).unwrap(),
            Rendezvous::Tcp {
                host: "node0.cluster".into(),
                port: 29500
            }
        );
        assert_eq!(
            e.rendezvous(Some("file:/shared/job.id")).unwrap(),
            Rendezvous::File("/shared/job.id".into())
        );
    }

    #[test]
    fn torchruns_agent_store_keeps_master_port() {
        let vars = [
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ];
        let e = env(&vars).unwrap();
        assert!(e.agent_store);
        assert_eq!(
            e.rendezvous(None).unwrap(),
            Rendezvous::Tcp {
                host: "127.0.0.1".into(),
                port: 29501
            }
        );
        let mut top = vars;
        top[4].1 = "65535";
        let m = env(&top).unwrap().rendezvous(None).unwrap_err().to_string();
        assert!(m.contains("MASTER_PORT=65535"), "{m}");
    }

    #[test]
    fn open_mpi_and_pmi_variables() {
        let e = env(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank), (3, 4, 1));
        assert_eq!(e.launcher, Launcher::OpenMpi);
        let e = env(&[("PMI_RANK", "2"), ("PMI_SIZE", "4"), ("SLURM_LOCALID", "0")]).unwrap();
        assert_eq!((e.rank, e.world, e.local_rank), (2, 4, 0));
        assert_eq!(e.launcher, Launcher::Pmi);
        let e = env(&[
            ("PMI_RANK", "2"),
            ("PMI_SIZE", "4"),
            ("MPI_LOCALRANKID", "2"),
            ("SLURM_LOCALID", "0"),
        ])
        .unwrap();
        assert_eq!(e.local_rank, 2, "MPI_LOCALRANKID comes first");
        // A single rank needs no local rank.
        assert_eq!(
            env(&[("PMI_RANK", "0"), ("PMI_SIZE", "1")])
                .unwrap()
                .local_rank,
            0
        );
    }

    #[test]
    fn torchrun_wins_over_the_mpi_that_started_it() {
        // srun/mpirun starts one torchrun agent per node; torchrun's variables describe the
        // processes it spawned.
        let e = env(&[
            ("PMI_RANK", "1"),
            ("PMI_SIZE", "2"),
            ("RANK", "12"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "4"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank), (12, 16, 4));
        assert_eq!(e.launcher, Launcher::Torchrun);
    }

    #[test]
    fn malformed_values_name_the_variable() {
        let m = err(&[("RANK", "one"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
        assert!(m.contains("RANK=\"one\"") && m.contains("integer"), "{m}");
        let m = err(&[("RANK", "0"), ("WORLD_SIZE", "-2"), ("LOCAL_RANK", "0")]);
        assert!(m.contains("WORLD_SIZE=\"-2\""), "{m}");
        let m = err(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2x"),
        ]);
        assert!(m.contains("OMPI_COMM_WORLD_SIZE"), "{m}");
        let m = err(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")]);
        assert!(
            m.contains("MASTER_PORT=\"70000\"") && m.contains("port"),
            "{m}"
        );
        let m = err(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "0")]);
        assert!(m.contains("MASTER_PORT"), "{m}");
    }

    #[test]
    fn inconsistent_values_name_the_variables() {
        let m = err(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
        assert!(m.contains("RANK=2 is not below WORLD_SIZE=2"), "{m}");
        let m = err(&[("PMI_RANK", "5"), ("PMI_SIZE", "4")]);
        assert!(m.contains("PMI_RANK=5") && m.contains("PMI_SIZE=4"), "{m}");
        let m = err(&[("RANK", "0"), ("WORLD_SIZE", "0")]);
        assert!(m.contains("WORLD_SIZE=0"), "{m}");
        let m = err(&[("RANK", "1")]);
        assert!(m.contains("RANK is set but WORLD_SIZE is not"), "{m}");
        let m = err(&[("WORLD_SIZE", "4")]);
        assert!(m.contains("WORLD_SIZE is set but RANK is not"), "{m}");
        let m = err(&[("RANK", "1"), ("WORLD_SIZE", "4")]);
        assert!(m.contains("LOCAL_RANK is not"), "{m}");
        let m = err(&[("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "2")]);
        assert!(m.contains("LOCAL_RANK=2 is above RANK=1"), "{m}");
        let m = err(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "5"),
            ("LOCAL_WORLD_SIZE", "4"),
        ]);
        assert!(
            m.contains("LOCAL_RANK=5 is not below LOCAL_WORLD_SIZE=4"),
            "{m}"
        );
        let m = err(&[("PMI_RANK", "1"), ("PMI_SIZE", "2")]);
        assert!(m.contains("MPI_LOCALRANKID / SLURM_LOCALID"), "{m}");
        let m = err(&[("MASTER_ADDR", "node0")]);
        assert!(m.contains("MASTER_PORT is not"), "{m}");
        let m = err(&[("MASTER_PORT", "29500")]);
        assert!(m.contains("MASTER_ADDR is not"), "{m}");
    }

    #[test]
    fn a_multi_rank_job_without_master_addr_needs_a_file_rendezvous() {
        let e = env(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")]).unwrap();
        let m = e.rendezvous(None).unwrap_err().to_string();
        assert!(
            m.contains("MASTER_ADDR is not set") && m.contains("2 ranks"),
            "{m}"
        );
        assert!(e.rendezvous(Some("file:/tmp/x")).is_ok());
        let m = e.rendezvous(Some("nowhere")).unwrap_err().to_string();
        assert!(m.contains("--rendezvous"), "{m}");
    }

    #[test]
    fn empty_values_count_as_unset() {
        assert_eq!(
            env(&[("RANK", ""), ("WORLD_SIZE", " ")]).unwrap(),
            DistEnv::single()
        );
    }
}
