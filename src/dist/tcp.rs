//! The CPU backend: every rank holds one TCP connection to rank 0, which combines each collective
//! (sums in rank order, so every rank gets bit-identical results) and sends the result back.
//! It is what CPU runs and the tests use; NCCL is the GPU backend.
//!
//! Rank 0 listens at `MASTER_ADDR:MASTER_PORT` (the rendezvous) and waits a bounded time for the
//! others; they retry their connection for as long. A peer that exits or crashes closes its
//! connection, and a peer that hangs stops answering: either way the others fail with an error
//! that names it, at their next collective, instead of waiting forever.

use super::comm::{from_bytes, to_bytes, Communicator};
use super::{Timeouts, World};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const HELLO: &[u8; 8] = b"ALBEFDP1";
/// No message of a run comes near this; a larger length means a stream out of step.
const MAX_MESSAGE: u64 = 1 << 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    AllReduce = 1,
    AllGather = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl Op {
    fn name(tag: u8) -> &'static str {
        match tag {
            1 => "all_reduce",
            2 => "all_gather",
            3 => "broadcast",
            4 => "barrier",
            _ => "an unknown message",
        }
    }
}

enum Links {
    /// Rank 0: the connection of rank r at r − 1.
    Hub(Vec<TcpStream>),
    /// Another rank: its connection to rank 0.
    Spoke(TcpStream),
    /// World size 1.
    Alone,
}

pub struct TcpCommunicator {
    rank: usize,
    world_size: usize,
    master: String,
    op_timeout: Duration,
    links: Mutex<Links>,
}

impl std::fmt::Debug for TcpCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpCommunicator(rank {} of {}, rendezvous {})", self.rank, self.world_size, self.master)
    }
}

/// Where rank 0 listens: the rendezvous address itself when it is a loopback one (nothing else
/// can join then), every interface otherwise (MASTER_ADDR may name this host by any address).
fn listen_addr(world: &World) -> String {
    let loopback = ["127.0.0.1", "localhost", "::1"].contains(&world.master_addr.as_str());
    if loopback {
        world.master()
    } else {
        format!("0.0.0.0:{}", world.master_port)
    }
}

impl TcpCommunicator {
    /// Joins the rendezvous of `world` (rank 0 listens, the others connect).
    pub fn init(world: &World, timeouts: Timeouts) -> Result<Self> {
        if world.world_size == 1 {
            return Ok(Self::alone(world.master()));
        }
        if world.rank == 0 {
            let addr = listen_addr(world);
            let listener = TcpListener::bind(&addr).with_context(|| {
                format!(
                    "rank 0 cannot listen at {addr} (MASTER_PORT in use by another run? choose another --master_port)"
                )
            })?;
            Self::accept(listener, world.world_size, &world.master(), timeouts)
        } else {
            Self::connect(&world.master(), world.rank, world.world_size, timeouts)
        }
    }

    fn alone(master: String) -> Self {
        Self { rank: 0, world_size: 1, master, op_timeout: Duration::MAX, links: Mutex::new(Links::Alone) }
    }

    /// Rank 0: waits for ranks 1 … world_size − 1 on `listener` (at most `timeouts.rendezvous`).
    /// `master` names the rendezvous in messages.
    pub fn accept(listener: TcpListener, world_size: usize, master: &str, timeouts: Timeouts) -> Result<Self> {
        if world_size == 1 {
            return Ok(Self::alone(master.to_string()));
        }
        let deadline = Instant::now() + timeouts.rendezvous;
        listener.set_nonblocking(true)?;
        let mut slots: Vec<Option<TcpStream>> = (1..world_size).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, from)) => {
                    stream.set_nonblocking(false)?;
                    match handshake_hub(&stream, world_size, &slots) {
                        Ok(rank) => {
                            setup(&stream, timeouts.op)?;
                            slots[rank - 1] = Some(stream);
                        }
                        // A stray connection (a port scanner, a process of another run) is
                        // refused and does not end the rendezvous.
                        Err(e) => eprintln!("rendezvous at {master}: refused a connection from {from}: {e:#}"),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        bail!(
                            "rendezvous at {master}: rank(s) {} of world size {world_size} did not join within {:?} \
                             (ALBEF_RENDEZVOUS_TIMEOUT); did they start, with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE?",
                            missing.join(", "),
                            timeouts.rendezvous
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).with_context(|| format!("rendezvous at {master}: accept failed")),
            }
        }
        let links = Links::Hub(slots.into_iter().map(|s| s.expect("every slot filled")).collect());
        Ok(Self { rank: 0, world_size, master: master.to_string(), op_timeout: timeouts.op, links: Mutex::new(links) })
    }

    /// Rank `rank` > 0: connects to rank 0 at `master`, retrying for at most `timeouts.rendezvous`.
    pub fn connect(master: &str, rank: usize, world_size: usize, timeouts: Timeouts) -> Result<Self> {
        let deadline = Instant::now() + timeouts.rendezvous;
        let stream = loop {
            let attempt = master.to_socket_addrs().map_err(|e| e.to_string()).and_then(|addrs| {
                let mut err = format!("{master} resolves to no address");
                for a in addrs {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                        Ok(s) => return Ok(s),
                        Err(e) => err = e.to_string(),
                    }
                }
                Err(err)
            });
            match attempt {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => bail!(
                    "rank {rank} could not reach the rendezvous at {master} within {:?} (ALBEF_RENDEZVOUS_TIMEOUT): \
                     {e}; is rank 0 running, and are MASTER_ADDR/MASTER_PORT the same on every rank?",
                    timeouts.rendezvous
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        setup(&stream, timeouts.rendezvous.max(Duration::from_secs(1)))?;
        let mut s = &stream;
        let mut hello = HELLO.to_vec();
        hello.extend((rank as u64).to_le_bytes());
        hello.extend((world_size as u64).to_le_bytes());
        s.write_all(&hello).with_context(|| format!("rendezvous at {master}: cannot send this rank's hello"))?;
        let mut len = [0u8; 8];
        s.read_exact(&mut len).with_context(|| format!("rendezvous at {master}: no answer from rank 0"))?;
        let mut answer = vec![0u8; u64::from_le_bytes(len).min(4096) as usize];
        s.read_exact(&mut answer)?;
        if answer != b"ok" {
            bail!("rendezvous at {master}: rank 0 refused rank {rank}: {}", String::from_utf8_lossy(&answer));
        }
        setup(&stream, timeouts.op)?;
        Ok(Self {
            rank,
            world_size,
            master: master.to_string(),
            op_timeout: timeouts.op,
            links: Mutex::new(Links::Spoke(stream)),
        })
    }

    fn peer_name(&self, rank: usize) -> String {
        if rank == 0 {
            format!("rank 0 (at {})", self.master)
        } else {
            format!("rank {rank}")
        }
    }

    fn io_error(&self, e: std::io::Error, peer: usize, op: u8) -> anyhow::Error {
        let who = self.peer_name(peer);
        let doing = Op::name(op);
        match e.kind() {
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionAborted => anyhow!(
                "rank {} of {}: {who} closed its connection during {doing}: it exited or crashed (see its own output)",
                self.rank,
                self.world_size
            ),
            ErrorKind::WouldBlock | ErrorKind::TimedOut => anyhow!(
                "rank {} of {}: {who} sent nothing for {:?} during {doing} (ALBEF_DIST_TIMEOUT): it hangs, or is far behind",
                self.rank,
                self.world_size,
                self.op_timeout
            ),
            _ => anyhow!("rank {} of {}: {doing} with {who} failed: {e}", self.rank, self.world_size),
        }
    }

    fn send(&self, mut stream: &TcpStream, peer: usize, op: Op, payload: &[u8]) -> Result<()> {
        let mut head = [0u8; 9];
        head[0] = op as u8;
        head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        stream.write_all(&head).and_then(|_| stream.write_all(payload)).map_err(|e| self.io_error(e, peer, op as u8))
    }

    fn recv(&self, mut stream: &TcpStream, peer: usize, op: Op) -> Result<Vec<u8>> {
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).map_err(|e| self.io_error(e, peer, op as u8))?;
        if head[0] != op as u8 {
            bail!(
                "rank {}: {} is in {} while this rank is in {} (the ranks went out of step)",
                self.rank,
                self.peer_name(peer),
                Op::name(head[0]),
                Op::name(op as u8)
            );
        }
        let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
        if len > MAX_MESSAGE {
            bail!("rank {}: {} announced a message of {len} bytes", self.rank, self.peer_name(peer));
        }
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload).map_err(|e| self.io_error(e, peer, op as u8))?;
        Ok(payload)
    }

    /// One collective: rank 0 gathers every rank's payload (in rank order), `combine`s them, and
    /// sends the result back to every rank.
    fn exchange(&self, op: Op, mine: &[u8], combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>>) -> Result<Vec<u8>> {
        let links = self.links.lock().map_err(|_| anyhow!("a thread panicked inside a collective"))?;
        match &*links {
            Links::Alone => combine(vec![mine.to_vec()]),
            Links::Spoke(stream) => {
                self.send(stream, 0, op, mine)?;
                self.recv(stream, 0, op)
            }
            Links::Hub(peers) => {
                let mut all = Vec::with_capacity(self.world_size);
                all.push(mine.to_vec());
                for (i, s) in peers.iter().enumerate() {
                    all.push(self.recv(s, i + 1, op)?);
                }
                let result = combine(all)?;
                for (i, s) in peers.iter().enumerate() {
                    self.send(s, i + 1, op, &result)?;
                }
                Ok(result)
            }
        }
    }
}

/// Rank 0's side of a hello: the joining rank, checked.
fn handshake_hub(stream: &TcpStream, world_size: usize, slots: &[Option<TcpStream>]) -> Result<usize> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut s = stream;
    let mut hello = [0u8; 24];
    s.read_exact(&mut hello).context("no hello")?;
    let refuse = |why: String| -> Result<usize> {
        let mut s = stream;
        let _ = s.write_all(&(why.len() as u64).to_le_bytes()).and_then(|_| s.write_all(why.as_bytes()));
        bail!(why)
    };
    if &hello[..8] != HELLO {
        return refuse("not an albef rank".into());
    }
    let rank = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes")) as usize;
    let theirs = u64::from_le_bytes(hello[16..24].try_into().expect("8 bytes")) as usize;
    if theirs != world_size {
        return refuse(format!("rank {rank} has world size {theirs}, rank 0 has {world_size}"));
    }
    if rank == 0 || rank >= world_size {
        return refuse(format!("rank {rank} is not a rank 1 … {} of world size {world_size}", world_size - 1));
    }
    if slots[rank - 1].is_some() {
        return refuse(format!("rank {rank} joined twice"));
    }
    s.write_all(&2u64.to_le_bytes()).and_then(|_| s.write_all(b"ok"))?;
    Ok(rank)
}

fn setup(stream: &TcpStream, timeout: Duration) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(())
}

/// `[len u64][bytes]` for each part.
fn pack(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for p in parts {
        out.extend((p.len() as u64).to_le_bytes());
        out.extend(p);
    }
    out
}

fn unpack(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut parts = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 8 {
            bail!("a truncated all_gather answer");
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        if bytes.len() < 8 + n {
            bail!("a truncated all_gather answer");
        }
        parts.push(bytes[8..8 + n].to_vec());
        bytes = &bytes[8 + n..];
    }
    Ok(parts)
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if t.dtype() != DType::F32 {
            bail!("all_reduce_sum takes f32 tensors, not {:?}", t.dtype());
        }
        let mine = to_bytes(t)?;
        let n = mine.len();
        let summed = self.exchange(Op::AllReduce, &mine, |all| {
            let mut acc = vec![0f32; n / 4];
            for (r, bytes) in all.iter().enumerate() {
                if bytes.len() != n {
                    bail!("all_reduce: rank {r} sent {} values, rank 0 {}", bytes.len() / 4, n / 4);
                }
                for (a, c) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
                    *a += f32::from_le_bytes(c.try_into().expect("4 bytes"));
                }
            }
            Ok(acc.iter().flat_map(|x| x.to_le_bytes()).collect())
        })?;
        if summed.len() != n {
            bail!("all_reduce: rank 0 answered {} values for {}", summed.len() / 4, n / 4);
        }
        from_bytes(&summed, DType::F32, t.dims(), t.device())
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let parts = self.all_gather_bytes(&to_bytes(t)?)?;
        let dims = t.dims();
        let tensors: Vec<Tensor> =
            parts.iter().map(|b| from_bytes(b, t.dtype(), dims, t.device())).collect::<Result<_>>()?;
        Ok(Tensor::cat(&tensors, 0)?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mine = if self.rank == root { to_bytes(t)? } else { Vec::new() };
        let bytes = self.broadcast_bytes(&mine, root)?;
        from_bytes(&bytes, t.dtype(), t.dims(), t.device())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let packed = self.exchange(Op::AllGather, bytes, |all| Ok(pack(&all)))?;
        let parts = unpack(&packed)?;
        if parts.len() != self.world_size {
            bail!("all_gather: {} parts for world size {}", parts.len(), self.world_size);
        }
        Ok(parts)
    }

    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        if root >= self.world_size {
            bail!("broadcast from rank {root} in a world of {}", self.world_size);
        }
        self.exchange(Op::Broadcast, bytes, |mut all| Ok(std::mem::take(&mut all[root])))
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(Op::Barrier, &[], |_| Ok(Vec::new()))?;
        Ok(())
    }
}

/// `world_size` communicators joined over loopback in this process, one per rank (for tests).
pub fn local_group(world_size: usize, timeouts: Timeouts) -> Result<Vec<TcpCommunicator>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let master = listener.local_addr()?.to_string();
    let joining: Vec<_> = (1..world_size)
        .map(|rank| {
            let master = master.clone();
            std::thread::spawn(move || TcpCommunicator::connect(&master, rank, world_size, timeouts))
        })
        .collect();
    let mut comms = vec![TcpCommunicator::accept(listener, world_size, &master, timeouts)?];
    for j in joining {
        comms.push(j.join().map_err(|_| anyhow!("a joining rank panicked"))??);
    }
    Ok(comms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::sync::Arc;

    fn timeouts(op_secs: f64) -> Timeouts {
        Timeouts { rendezvous: Duration::from_secs(10), op: Duration::from_secs_f64(op_secs) }
    }

    #[test]
    fn collectives_agree_on_every_rank() {
        let comms = local_group(3, timeouts(30.0)).unwrap();
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let r = c.rank() as f32;
                    let dev = Device::Cpu;
                    let sum = c.all_reduce_sum(&Tensor::new(&[r, 1.0, 0.5], &dev).unwrap()).unwrap();
                    let gathered = c.all_gather(&Tensor::new(&[[r as i64, 7]], &dev).unwrap()).unwrap();
                    let b = c.broadcast(&Tensor::new(&[r + 10.0], &dev).unwrap(), 2).unwrap();
                    let bytes = c.all_gather_bytes(&vec![c.rank() as u8; c.rank()]).unwrap();
                    let means = c
                        .all_reduce_mean(&[Tensor::new(&[r], &dev).unwrap(), Tensor::new(&[[2.0 * r]], &dev).unwrap()])
                        .unwrap();
                    c.barrier().unwrap();
                    (
                        sum.to_vec1::<f32>().unwrap(),
                        gathered.to_vec2::<i64>().unwrap(),
                        b.to_vec1::<f32>().unwrap(),
                        bytes,
                        means[0].to_vec1::<f32>().unwrap(),
                        means[1].to_vec2::<f32>().unwrap(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (sum, gathered, b, bytes, m0, m1) = h.join().unwrap();
            assert_eq!(sum, [3.0, 3.0, 1.5]);
            assert_eq!(gathered, [[0, 7], [1, 7], [2, 7]]);
            assert_eq!(b, [12.0]);
            assert_eq!(bytes, [vec![], vec![1], vec![2, 2]]);
            assert_eq!(m0, [1.0]);
            assert_eq!(m1, [[2.0]]);
        }
    }

    #[test]
    fn a_peer_that_leaves_or_hangs_fails_the_others() {
        // Rank 1 leaves (its connection closes): rank 0's next collective names it.
        let mut comms = local_group(2, timeouts(30.0)).unwrap();
        let one = comms.pop().unwrap();
        let zero = comms.pop().unwrap();
        drop(one);
        let e = zero.barrier().unwrap_err().to_string();
        assert!(e.contains("rank 1 closed its connection during barrier"), "{e}");
        // Rank 0 leaves: rank 1 names rank 0 and the rendezvous address.
        let mut comms = local_group(2, timeouts(30.0)).unwrap();
        let one = comms.pop().unwrap();
        drop(comms);
        let e = one.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(e.contains("rank 0 (at 127.0.0.1:") && e.contains("closed its connection"), "{e}");
        // Rank 1 stays but never calls: rank 0 gives up after the op timeout.
        let mut comms = local_group(2, timeouts(0.5)).unwrap();
        let one = Arc::new(comms.pop().unwrap());
        let zero = comms.pop().unwrap();
        let start = Instant::now();
        let e = zero.barrier().unwrap_err().to_string();
        assert!(e.contains("rank 1 sent nothing for") && e.contains("ALBEF_DIST_TIMEOUT"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10));
        drop(one);
    }

    #[test]
    fn a_missing_rank_ends_the_rendezvous_with_its_address() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let master = listener.local_addr().unwrap().to_string();
        let t = Timeouts { rendezvous: Duration::from_millis(300), op: Duration::from_secs(1) };
        let e = TcpCommunicator::accept(listener, 3, &master, t).unwrap_err().to_string();
        assert!(e.contains(&format!("rendezvous at {master}: rank(s) 1, 2 of world size 3 did not join")), "{e}");
        drop(e);
        // Nobody listens at a closed port: the joining rank names the address it tried.
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let e = TcpCommunicator::connect(&closed, 1, 2, t).unwrap_err().to_string();
        assert!(e.contains(&format!("rank 1 could not reach the rendezvous at {closed}")), "{e}");
    }
}
