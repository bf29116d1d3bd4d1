//! Cluster launch: `-w/--workers`, `-n/--processes`, `-p/--process`, `-h/--hostfile` to a timely
//! [`timely::Config`]. We build the config ourselves because timely's own argument parser rejects
//! every flag it does not know (and ours would be many).

use clap::Args;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
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
    /// Seconds to wait for every process of the job to connect before giving up.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub connect_timeout: u64,
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
    /// A hostfile line that is not a `host:port` this machine can resolve.
    #[error("hostfile {path}, line for process {process}: {address:?} {why}")]
    BadAddress {
        /// The hostfile.
        path: PathBuf,
        /// The process the line is for.
        process: usize,
        /// The line.
        address: String,
        /// What is wrong with it.
        why: String,
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
                // Checked here, by every process: timely retries a bad address forever.
                for (process, line) in hosts.iter().enumerate() {
                    // A process's line may list several addresses to listen on.
                    for address in line.split_whitespace() {
                        check_address(address).map_err(|why| ClusterError::BadAddress {
                            path: path.clone(),
                            process,
                            address: address.to_owned(),
                            why,
                        })?;
                    }
                }
                Ok(hosts)
            }
        }
    }

    /// Total workers in the job.
    pub fn peers(&self) -> usize {
        self.workers * self.processes
    }

    /// Runs `func` on every worker of the job (`timely::execute`), with the two guards a
    /// multi-process job needs: processes that do not all connect within `--connect-timeout`
    /// end this one with a clear error (timely would wait forever), and a peer lost mid-job
    /// (killed, its machine gone) ends this process with a clear error and exit status 1 rather
    /// than a panic inside timely's networking (whose channels are then poisoned).
    pub fn execute<T, F>(
        &self,
        config: timely::Config,
        func: F,
    ) -> Result<timely::communication::WorkerGuards<T>, String>
    where
        T: Send + 'static,
        F: Fn(&mut timely::worker::Worker) -> T + Send + Sync + 'static,
    {
        if self.processes <= 1 {
            return timely::execute(config, func);
        }
        exit_on_lost_peer(self.process);
        let connected = Arc::new(AtomicBool::new(false));
        let watched = connected.clone();
        let (timeout, process, processes) = (self.connect_timeout, self.process, self.processes);
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
            while std::time::Instant::now() < deadline {
                if watched.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!(
                "error: process {process} of {processes}: not every process connected within \
                 --connect-timeout {timeout}s; check that all {processes} are started with the \
                 same -n and hostfile, and that their addresses are reachable"
            );
            std::process::exit(1);
        });
        let guards = timely::execute(config, func);
        connected.store(true, Ordering::SeqCst);
        guards
    }
}

/// Whether `address` is a `host:port` with a port in 1..=65535 that resolves.
fn check_address(address: &str) -> Result<(), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("has no port: expected host:port".into());
    };
    if host.is_empty() {
        return Err("has no host: expected host:port".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("has port {port:?}: expected 1..65535")),
    }
    match address.to_socket_addrs() {
        Ok(addrs) if addrs.len() > 0 => Ok(()),
        Ok(_) => Err("resolves to no address".into()),
        Err(e) => Err(format!("does not resolve: {e}")),
    }
}

/// Turns the panics of timely's networking (a peer's socket closed or reset, and the poisoned
/// queues that follow in every worker) into one clear message and exit status 1. Any other panic
/// goes to the default hook.
fn exit_on_lost_peer(process: usize) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let from_networking = [
                "timely communication error",
                "MergeQueue",
                "Send thread panic",
                "Recv thread panic",
            ]
            .iter()
            .any(|m| message.contains(m));
            if !from_networking {
                return default(info);
            }
            eprintln!(
                "error: process {process} lost its connection to another process of the job \
                 ({message}); stopping. Start every process again with the same command: the \
                 job goes on from what it wrote."
            );
            std::process::exit(1);
        }));
    });
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
            connect_timeout: 300,
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
        std::fs::write(&path, "# cluster\n127.0.0.1:3000\n\nlocalhost:3001\n").unwrap();
        let mut a = args(1, 2, 0);
        a.hostfile = Some(path.clone());
        assert_eq!(a.addresses().unwrap(), ["127.0.0.1:3000", "localhost:3001"]);
        a.processes = 3;
        assert!(matches!(
            a.addresses(),
            Err(ClusterError::TooFewHosts { found: 2, .. })
        ));
        // A line timely would retry forever: no port, a port out of range, no such host.
        for bad in ["localhost", "localhost:99999", "no-such-host.invalid:3000"] {
            std::fs::write(&path, format!("127.0.0.1:3000\n{bad}\n")).unwrap();
            a.processes = 2;
            match a.addresses() {
                Err(ClusterError::BadAddress {
                    process, address, ..
                }) => assert_eq!((process, address.as_str()), (1, bad)),
                other => panic!("{bad}: {other:?}"),
            }
        }
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
