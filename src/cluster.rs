//! Cluster launch: `-w/--workers`, `-n/--processes`, `-p/--process`, `-h/--hostfile` to a timely
//! [`timely::Config`]. We build the config ourselves because timely's own argument parser rejects
//! every flag it does not know (and ours would be many).

use clap::Args;
use std::path::PathBuf;
use thiserror::Error;

/// The cluster flags shared by every job.
#[derive(Args, Clone, Debug, Default)]
pub struct ClusterArgs {
    /// Worker threads per process.
    #[arg(short = 'w', long = "workers", default_value_t = 1, value_name = "N")]
    pub workers: usize,
    /// Number of processes in the job (each runs the same command with its own -p).
    #[arg(short = 'n', long = "processes", default_value_t = 1, value_name = "N")]
    pub processes: usize,
    /// This process's index, 0..N.
    #[arg(short = 'p', long = "process", default_value_t = 0, value_name = "I")]
    pub process: usize,
    /// File with one `host:port` per line, one line per process (default: localhost:2101, 2102, ...).
    #[arg(short = 'h', long = "hostfile", value_name = "HOSTFILE")]
    pub hostfile: Option<PathBuf>,
}

/// A cluster description that cannot run.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// Zero workers or processes.
    #[error("--workers and --processes must be at least 1 (got -w {workers} -n {processes})")]
    Zero {
        /// `-w`.
        workers: usize,
        /// `-n`.
        processes: usize,
    },
    /// More workers than the machine can run (each worker is a thread with channels to every
    /// other: `-w 1000` takes gigabytes before reading a byte).
    #[error(
        "--workers {workers} is more than this machine runs well: at most {max} \
         (4 per core, between 8 and 512)"
    )]
    TooManyWorkers {
        /// `-w`.
        workers: usize,
        /// The bound on this machine.
        max: usize,
    },
    /// `-p` outside `0..-n`.
    #[error(
        "--process {process} is out of range for --processes {processes} (valid: 0..{processes})"
    )]
    ProcessOutOfRange {
        /// `-p`.
        process: usize,
        /// `-n`.
        processes: usize,
    },
    /// The hostfile could not be read.
    #[error("cannot read hostfile {path}: {source}")]
    Hostfile {
        /// The hostfile.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The hostfile lists fewer hosts than processes.
    #[error("hostfile {path} lists {found} addresses, but --processes is {processes}")]
    TooFewHosts {
        /// The hostfile.
        path: PathBuf,
        /// Addresses it lists.
        found: usize,
        /// `-n`.
        processes: usize,
    },
}

/// The most worker threads per process: 4 per core, at least 8, at most 512.
pub fn max_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cores).clamp(8, 512)
}

/// The first port of the default localhost addresses (timely's convention).
pub const DEFAULT_BASE_PORT: u16 = 2101;

impl ClusterArgs {
    /// The timely configuration these flags describe.
    pub fn timely_config(&self) -> Result<timely::Config, ClusterError> {
        use timely::CommunicationConfig as Comm;
        if self.workers == 0 || self.processes == 0 {
            return Err(ClusterError::Zero {
                workers: self.workers,
                processes: self.processes,
            });
        }
        let max = max_workers();
        if self.workers > max {
            return Err(ClusterError::TooManyWorkers {
                workers: self.workers,
                max,
            });
        }
        if self.process >= self.processes {
            return Err(ClusterError::ProcessOutOfRange {
                process: self.process,
                processes: self.processes,
            });
        }
        let communication = if self.processes > 1 {
            Comm::Cluster {
                threads: self.workers,
                process: self.process,
                addresses: self.addresses()?,
                report: false,
                zerocopy: false,
            }
        } else if self.workers > 1 {
            Comm::Process(self.workers)
        } else {
            Comm::Thread
        };
        Ok(timely::Config {
            communication,
            worker: timely::WorkerConfig::default(),
        })
    }

    /// The address of every process, from the hostfile or the localhost default.
    pub fn addresses(&self) -> Result<Vec<String>, ClusterError> {
        match &self.hostfile {
            None => Ok((0..self.processes)
                .map(|i| format!("localhost:{}", DEFAULT_BASE_PORT as usize + i))
                .collect()),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ClusterError::Hostfile {
                        path: path.clone(),
                        source,
                    })?;
                let hosts: Vec<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .take(self.processes)
                    .map(str::to_owned)
                    .collect();
                if hosts.len() < self.processes {
                    return Err(ClusterError::TooFewHosts {
                        path: path.clone(),
                        found: hosts.len(),
                        processes: self.processes,
                    });
                }
                Ok(hosts)
            }
        }
    }

    /// Total workers in the job.
    pub fn peers(&self) -> usize {
        self.workers * self.processes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use timely::CommunicationConfig as Comm;

    fn args(w: usize, n: usize, p: usize) -> ClusterArgs {
        ClusterArgs {
            workers: w,
            processes: n,
            process: p,
            hostfile: None,
        }
    }

    #[test]
    fn single_thread_and_process() {
        assert!(matches!(
            args(1, 1, 0).timely_config().unwrap().communication,
            Comm::Thread
        ));
        assert!(matches!(
            args(3, 1, 0).timely_config().unwrap().communication,
            Comm::Process(3)
        ));
    }

    #[test]
    fn cluster_defaults_to_localhost_ports() {
        match args(2, 3, 1).timely_config().unwrap().communication {
            Comm::Cluster {
                threads,
                process,
                addresses,
                ..
            } => {
                assert_eq!((threads, process), (2, 1));
                assert_eq!(
                    addresses,
                    ["localhost:2101", "localhost:2102", "localhost:2103"]
                );
            }
            other => panic!("expected a cluster, got {other:?}"),
        }
    }

    #[test]
    fn hostfile_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, "# cluster\nnode-a:3000\n\nnode-b:3000\n").unwrap();
        let mut a = args(1, 2, 0);
        a.hostfile = Some(path.clone());
        assert_eq!(a.addresses().unwrap(), ["node-a:3000", "node-b:3000"]);
        a.processes = 3;
        assert!(matches!(
            a.addresses(),
            Err(ClusterError::TooFewHosts { found: 2, .. })
        ));
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(matches!(
            args(0, 1, 0).timely_config(),
            Err(ClusterError::Zero { .. })
        ));
        assert!(matches!(
            args(1, 2, 2).timely_config(),
            Err(ClusterError::ProcessOutOfRange { .. })
        ));
    }
}
