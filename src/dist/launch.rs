//! `albef launch`: one process per local rank, as `torchrun --nproc_per_node N`, with the
//! variables [`super::World`] reads; their output is forwarded line by line, prefixed with the
//! rank; when one fails, the others are stopped and the launch fails.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    /// Host of global rank 0 (required for several nodes; 127.0.0.1 on one).
    pub master_addr: Option<String>,
    pub master_port: u16,
    /// The albef subcommand and its flags.
    pub command: Vec<String>,
}

/// Copies `from` to our stdout or stderr, one line at a time, each after `prefix`.
fn forward(from: impl Read + Send + 'static, prefix: String, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let mut out = prefix.clone().into_bytes();
                    out.extend_from_slice(&line);
                    if !out.ends_with(b"\n") {
                        out.push(b'\n');
                    }
                    // One write per line, so that lines of different ranks do not interleave.
                    let _ =
                        if to_stderr { std::io::stderr().write_all(&out) } else { std::io::stdout().write_all(&out) };
                }
            }
        }
    })
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("was killed by signal {sig}");
        }
    }
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => format!("ended ({status})"),
    }
}

/// Runs `exe opts.command…` once per local rank and waits for all of them.
pub fn launch(opts: &LaunchOptions, exe: &Path) -> Result<()> {
    if opts.nproc_per_node == 0 || opts.nnodes == 0 {
        bail!("--nproc_per_node and --nnodes must be at least 1");
    }
    if opts.node_rank >= opts.nnodes {
        bail!("--node_rank {} is not below --nnodes {}", opts.node_rank, opts.nnodes);
    }
    if opts.command.is_empty() {
        bail!("nothing to launch: give the albef subcommand after `--` (e.g. `albef launch --nproc_per_node 2 -- retrieval --config …`)");
    }
    if opts.command[0] == "launch" {
        bail!("`albef launch` cannot launch itself");
    }
    let master_addr = match (&opts.master_addr, opts.nnodes) {
        (Some(a), _) => a.clone(),
        (None, 1) => "127.0.0.1".to_string(),
        (None, _) => bail!("--master_addr is needed with --nnodes > 1: the host of node 0, reachable from every node"),
    };
    let world_size = opts.nnodes * opts.nproc_per_node;
    // Share the cores between the local processes (torchrun sets OMP_NUM_THREADS=1 likewise),
    // unless the user chose.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / opts.nproc_per_node).max(1).to_string();
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut forwarders = Vec::new();
    for local in 0..opts.nproc_per_node {
        let rank = opts.node_rank * opts.nproc_per_node + local;
        let mut cmd = Command::new(exe);
        cmd.args(&opts.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", opts.nproc_per_node.to_string())
            .env("GROUP_RANK", opts.node_rank.to_string())
            .env("MASTER_ADDR", &master_addr)
            .env("MASTER_PORT", opts.master_port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", &threads);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut children);
                return Err(e).with_context(|| format!("cannot start rank {rank} ({})", exe.display()));
            }
        };
        let prefix = format!("[rank {rank}] ");
        forwarders.push(forward(child.stdout.take().expect("piped"), prefix.clone(), false));
        forwarders.push(forward(child.stderr.take().expect("piped"), prefix, true));
        children.push((rank, child));
    }
    let result = wait_all(&mut children);
    for f in forwarders {
        let _ = f.join();
    }
    result
}

/// Waits until every child succeeded, or one failed (then the others are killed).
fn wait_all(children: &mut [(usize, Child)]) -> Result<()> {
    let mut running: Vec<bool> = vec![true; children.len()];
    loop {
        for i in 0..children.len() {
            if !running[i] {
                continue;
            }
            let (rank, child) = &mut children[i];
            let rank = *rank;
            if let Some(status) = child.try_wait()? {
                running[i] = false;
                if !status.success() {
                    let what = describe(status);
                    eprintln!("launch: rank {rank} {what}; stopping the other ranks");
                    for (j, (_, other)) in children.iter_mut().enumerate() {
                        if running[j] {
                            let _ = other.kill();
                            let _ = other.wait();
                        }
                    }
                    bail!("rank {rank} {what} (its output above, prefixed [rank {rank}])");
                }
            }
        }
        if running.iter().all(|r| !r) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
