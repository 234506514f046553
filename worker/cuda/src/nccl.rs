//! NCCL between GPU ranks, loaded at run time like the rest of CUDA: one communicator per rank,
//! bootstrapped from an id that one rank makes and the others receive over the control plane, and
//! byte ranges (token rows) sent to and received from peers in one group on the rank's stream.
//!
//! Communicators are non-blocking, so nothing waits on NCCL without a deadline: a join whose peer
//! never comes fails when its deadline passes, and [`RankComm::abort`] (from any thread) ends the
//! transfers of a communicator whose peer is gone, so the stream behind them runs on.

use crate::gpu::Gpu;
use anyhow::{anyhow, bail, Result};
use cudarc::nccl::{result, sys};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes of an NCCL communicator id, as the control plane carries it.
pub const ID_BYTES: usize = 128;

/// Whether libnccl can be loaded here.
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

fn ensure_available() -> Result<()> {
    if !available() {
        bail!("NCCL (libnccl.so.2) was not found: install it or put its directory on LD_LIBRARY_PATH");
    }
    Ok(())
}

/// An NCCL result code as NCCL names and explains it.
fn describe_code(code: sys::ncclResult_t) -> String {
    // SAFETY: NCCL returns a static NUL-terminated string for every result code.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(code)) };
    format!("{code:?} ({})", text.to_string_lossy())
}

fn describe(e: result::NcclError) -> String {
    describe_code(e.0)
}

/// A new communicator id, made by one rank and handed to the others.
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    ensure_available()?;
    let id = result::get_uniqueid().map_err(|e| anyhow!("creating an NCCL communicator id: {}", describe(e)))?;
    Ok(id.internal.map(|c| c as u8))
}

/// The id as the control plane carries it, checked for length.
pub fn id_from_bytes(bytes: &[u8]) -> Result<[u8; ID_BYTES]> {
    bytes
        .try_into()
        .map_err(|_| anyhow!("an NCCL communicator id has {ID_BYTES} bytes, not {}", bytes.len()))
}

/// `NCCL_CONFIG_UNDEF_INT`: a field left to NCCL's default.
const UNDEF_INT: i32 = i32::MIN;

/// A configuration with `blocking` as given, every other field left to NCCL
/// (`NCCL_CONFIG_INITIALIZER`).
fn config(blocking: bool) -> sys::ncclConfig_t {
    // SAFETY: all-zero is valid for this plain C struct (integers and null pointers); every
    // field NCCL reads is set below.
    let mut c: sys::ncclConfig_t = unsafe { std::mem::zeroed() };
    c.size = std::mem::size_of::<sys::ncclConfig_t>();
    c.magic = 0xcafe_beef;
    // NCCL_VERSION(2, 28, 0): the layout of the struct above; newer libraries read it as such.
    c.version = 22800;
    c.blocking = i32::from(blocking);
    c.cgaClusterSize = UNDEF_INT;
    c.minCTAs = UNDEF_INT;
    c.maxCTAs = UNDEF_INT;
    c.splitShare = UNDEF_INT;
    c.trafficClass = UNDEF_INT;
    c.collnetEnable = UNDEF_INT;
    c.CTAPolicy = UNDEF_INT;
    c.shrinkShare = UNDEF_INT;
    c.nvlsCTAs = UNDEF_INT;
    c.nChannelsPerNetPeer = UNDEF_INT;
    c.nvlinkCentricSched = UNDEF_INT;
    c
}

/// One rank's communicator.
pub struct RankComm {
    /// The blocking communicator transfers are queued on; `None` once aborted.
    comm: Mutex<Option<Comm>>,
    /// The non-blocking one it was split from (joined under a deadline); `None` once aborted.
    parent: Mutex<Option<Comm>>,
    pub rank: usize,
    pub world: usize,
}

struct Comm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one call at a time (the mutex), and
// aborted from another thread while its transfers wait on the GPU.
unsafe impl Send for Comm {}

/// How often a non-blocking communicator's state is polled while a caller waits on it, after
/// `SPINS` polls in a row.
const POLL: Duration = Duration::from_micros(50);
const SPINS: u32 = 1000;

impl RankComm {
    /// Joins communicator `id` as `rank` of `world` on `gpu`'s device. Returns once every rank
    /// has joined; fails (on every rank) where NCCL refuses the set, e.g. two ranks on one GPU,
    /// and on this rank when the set has not formed by `deadline`.
    pub fn join(gpu: &Gpu, id: &[u8; ID_BYTES], rank: usize, world: usize, deadline: Duration) -> Result<Self> {
        Self::join_on(&gpu.ctx, id, rank, world, deadline)
    }

    /// [`RankComm::join`] on GPU `ordinal` (the device a model runs on, without its [`Gpu`]).
    pub fn join_device(
        ordinal: usize,
        id: &[u8; ID_BYTES],
        rank: usize,
        world: usize,
        deadline: Duration,
    ) -> Result<Self> {
        let ctx = cudarc::driver::CudaContext::new(ordinal)?;
        Self::join_on(&ctx, id, rank, world, deadline)
    }

    fn join_on(
        ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
        id: &[u8; ID_BYTES],
        rank: usize,
        world: usize,
        deadline: Duration,
    ) -> Result<Self> {
        ensure_available()?;
        if rank >= world {
            bail!("NCCL rank {rank} is outside a world of {world}");
        }
        ctx.bind_to_thread()?;
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as core::ffi::c_char),
        };
        let failed = |why: String| anyhow!("NCCL rank {rank} of {world} could not join its communicator: {why}");
        let deadline = Instant::now() + deadline;
        // Joined non-blocking, so a peer that never comes costs the deadline, not a hang.
        let mut parent: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `parent` and the config are valid for the call; the id is the one every rank uses.
        let started =
            unsafe { result::comm_init_rank_config(&mut parent, world as i32, id, rank as i32, &mut config(false)) };
        let joined = RankComm {
            comm: Mutex::new(None),
            parent: Mutex::new((!parent.is_null()).then_some(Comm(parent))),
            rank,
            world,
        };
        started.map_err(|e| failed(describe(e)))?;
        settle_raw(parent, deadline).map_err(|why| {
            joined.abort();
            failed(why)
        })?;
        // Then split into a blocking communicator for the transfers: queuing on a non-blocking
        // one hands every group to NCCL's thread (about 0.1 ms each, measured), a blocking one
        // queues it at once.
        let mut child: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: a joined communicator, a valid out-pointer and config; every rank splits alike.
        let split = unsafe { sys::ncclCommSplit(parent, 0, rank as i32, &mut child, &mut config(true)) };
        // The split is the non-blocking parent's operation: NCCL's thread writes the child's
        // handle when it is done.
        let split_done = match split {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => {
                settle_raw(parent, deadline).and_then(|()| {
                    // SAFETY: written by NCCL before the parent's operation settled (above).
                    let child = unsafe { std::ptr::read_volatile(&child) };
                    if child.is_null() {
                        return Err("NCCL made no communicator".into());
                    }
                    if let Ok(mut c) = joined.comm.lock() {
                        *c = Some(Comm(child));
                    }
                    settle_raw(child, deadline)
                })
            }
            code => Err(describe_code(code)),
        };
        split_done.map_err(|why| {
            joined.abort();
            failed(format!("splitting a blocking communicator: {why}"))
        })?;
        joined
            .connect(ctx, deadline)
            .map_err(|why| failed(format!("connecting to its peers: {why:#}")))?;
        Ok(joined)
    }

    /// One byte to and from every peer in one group, so every connection is made now and made
    /// alike on both sides (NCCL makes a pair's connections at their first use and expects the
    /// two sides to ask for the same ones; a pair whose first exchange is a send and a receive on
    /// one side and a receive alone on the other fails with ncclInternalError).
    fn connect(&self, ctx: &std::sync::Arc<cudarc::driver::CudaContext>, deadline: Instant) -> Result<()> {
        let stream = ctx.new_stream()?;
        let buf = stream.alloc_zeros::<u8>(2 * self.world)?;
        {
            let (base, _record) = cudarc::driver::DevicePtr::device_ptr(&buf, &stream);
            let guard = self.comm.lock().map_err(|_| anyhow!("NCCL communicator poisoned"))?;
            let comm = guard.as_ref().ok_or_else(|| anyhow!("the communicator was aborted"))?.0;
            let raw = stream.cu_stream() as sys::cudaStream_t;
            let byte = sys::ncclDataType_t::ncclUint8;
            result::group_start().map_err(|e| anyhow!(describe(e)))?;
            let queued = (|| {
                for peer in (0..self.world).filter(|&p| p != self.rank) {
                    let (mine, theirs) = (base + self.rank as u64, base + (self.world + peer) as u64);
                    // SAFETY: one byte each inside `buf`, alive until the stream is synchronised below.
                    unsafe { result::send(mine as *const _, 1, byte, peer as i32, comm, raw) }?;
                    unsafe { result::recv(theirs as *mut _, 1, byte, peer as i32, comm, raw) }?;
                }
                Ok(())
            })();
            let ended = result::group_end();
            queued.map_err(|e| anyhow!(describe(e)))?;
            ended.map_err(|e| anyhow!(describe(e)))?;
        }
        self.settle(deadline)?;
        stream.synchronize()?;
        Ok(())
    }

    /// Waits until the communicator's last operation is done; on an error or past `deadline`
    /// the communicator is aborted and the error returned.
    fn settle(&self, deadline: Instant) -> Result<()> {
        let comm = {
            let guard = self.comm.lock().map_err(|_| anyhow!("NCCL communicator poisoned"))?;
            guard.as_ref().ok_or_else(|| anyhow!("the communicator was aborted"))?.0
        };
        settle_raw(comm, deadline).map_err(|why| {
            self.abort();
            anyhow!(why)
        })
    }

    /// Ends the communicator now: transfers queued on it stop waiting for their peer (their
    /// data is lost), and every later use fails. For a peer that is gone; callable from any thread.
    pub fn abort(&self) {
        for held in [&self.comm, &self.parent] {
            let taken = held.lock().ok().and_then(|mut c| c.take());
            if let Some(comm) = taken {
                // SAFETY: a communicator this rank joined, not used after (taken out of `self`).
                unsafe {
                    let _ = result::comm_abort(comm.0);
                }
            }
        }
    }

    /// Whether [`RankComm::abort`] has ended it.
    pub fn aborted(&self) -> bool {
        self.comm.lock().map(|c| c.is_none()).unwrap_or(true)
    }

    /// Sends and receives byte ranges in one group, queued on `gpu`'s stream in order with its
    /// kernels: each send is (peer, device address, bytes), each receive likewise.
    pub fn exchange(&self, gpu: &Gpu, sends: &[(usize, u64, usize)], recvs: &[(usize, u64, usize)]) -> Result<()> {
        for &(peer, _, _) in sends.iter().chain(recvs) {
            if peer >= self.world {
                bail!("NCCL peer {peer} is outside a world of {}", self.world);
            }
        }
        gpu.bind()?;
        let stream = gpu.launch_stream() as sys::cudaStream_t;
        let failed = |why: String| anyhow!("NCCL exchange of rank {}: {why}", self.rank);
        {
            let guard = self.comm.lock().map_err(|_| failed("communicator poisoned".into()))?;
            let comm = guard
                .as_ref()
                .ok_or_else(|| failed("the communicator was aborted (its peer is gone)".into()))?
                .0;
            result::group_start().map_err(|e| failed(describe(e)))?;
            let byte = sys::ncclDataType_t::ncclUint8;
            let queued = (|| {
                // SAFETY (both loops): the caller's device ranges of `bytes` bytes, alive until
                // the stream has run the group (sends read them, receives write them).
                for &(peer, addr, bytes) in sends {
                    unsafe { result::send(addr as *const _, bytes, byte, peer as i32, comm, stream) }?;
                }
                for &(peer, addr, bytes) in recvs {
                    unsafe { result::recv(addr as *mut _, bytes, byte, peer as i32, comm, stream) }?;
                }
                Ok(())
            })();
            // The group is closed whatever happened inside it.
            let ended = result::group_end();
            queued.map_err(|e| failed(describe(e)))?;
            ended.map_err(|e| failed(describe(e)))?;
        }
        // The transfer communicator is blocking and connected at the join, so the group is
        // queued by now; NCCL's asynchronous errors (a failed peer) are reported here.
        self.settle(Instant::now() + SETTLE_DEADLINE)
            .map_err(|e| failed(e.to_string()))
    }
}

/// The longest an exchange waits for NCCL to report its group queued.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

impl Drop for RankComm {
    fn drop(&mut self) {
        if let Some(comm) = self.comm.get_mut().ok().and_then(Option::take) {
            // SAFETY: the communicator this rank joined, not used after.
            unsafe {
                let _ = result::comm_destroy(comm.0);
            }
        }
        if let Some(parent) = self.parent.get_mut().ok().and_then(Option::take) {
            // SAFETY: as above. Aborted, not destroyed: it has no transfers, and a non-blocking
            // communicator's destroy may return before it is done.
            unsafe {
                let _ = result::comm_abort(parent.0);
            }
        }
    }
}

/// Polls a communicator until its last operation is done: `Err` with NCCL's reason, or when
/// `deadline` passes first.
fn settle_raw(comm: sys::ncclComm_t, deadline: Instant) -> Result<(), String> {
    let mut polled = 0u32;
    loop {
        polled = polled.saturating_add(1);
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator and a valid out-pointer.
        let asked = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        if asked != sys::ncclResult_t::ncclSuccess {
            return Err(describe_code(asked));
        }
        match state {
            sys::ncclResult_t::ncclSuccess => return Ok(()),
            // Spin briefly before sleeping between polls (connecting takes milliseconds).
            sys::ncclResult_t::ncclInProgress if polled <= SPINS => std::thread::yield_now(),
            sys::ncclResult_t::ncclInProgress if Instant::now() < deadline => std::thread::sleep(POLL),
            sys::ncclResult_t::ncclInProgress => return Err("its peers did not answer in time".into()),
            code => return Err(describe_code(code)),
        }
    }
}
