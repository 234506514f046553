//! NCCL between GPU ranks, loaded at run time like the rest of CUDA: one communicator per rank,
//! bootstrapped from an id that one rank makes and the others receive over the control plane, and
//! byte ranges (token rows) sent to and received from peers in one group on the rank's stream.

use crate::gpu::Gpu;
use anyhow::{anyhow, bail, Result};
use cudarc::nccl::{result, sys};

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

/// An NCCL failure as NCCL names and explains it.
fn describe(e: result::NcclError) -> String {
    // SAFETY: NCCL returns a static NUL-terminated string for every result code.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(e.0)) };
    format!("{:?} ({})", e.0, text.to_string_lossy())
}

/// A new communicator id, made by one rank and handed to the others.
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    ensure_available()?;
    let id = result::get_uniqueid().map_err(|e| anyhow!("creating an NCCL communicator id: {}", describe(e)))?;
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's communicator.
pub struct RankComm {
    comm: sys::ncclComm_t,
    pub rank: usize,
    pub world: usize,
}

impl RankComm {
    /// Joins communicator `id` as `rank` of `world` on `gpu`'s device. Returns once every rank
    /// has joined; fails (on every rank) where NCCL refuses the set, e.g. two ranks on one GPU.
    pub fn join(gpu: &Gpu, id: &[u8; ID_BYTES], rank: usize, world: usize) -> Result<Self> {
        ensure_available()?;
        if rank >= world {
            bail!("NCCL rank {rank} is outside a world of {world}");
        }
        gpu.bind()?;
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as core::ffi::c_char),
        };
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is the one every rank of the set uses.
        unsafe { result::comm_init_rank(&mut comm, world as i32, id, rank as i32) }.map_err(|e| {
            anyhow!(
                "NCCL rank {rank} of {world} could not join its communicator: {}",
                describe(e)
            )
        })?;
        Ok(RankComm { comm, rank, world })
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
        let failed = |e: result::NcclError| anyhow!("NCCL exchange of rank {}: {}", self.rank, describe(e));
        result::group_start().map_err(failed)?;
        let byte = sys::ncclDataType_t::ncclUint8;
        let queued = (|| {
            // SAFETY (both loops): the caller's device ranges of `bytes` bytes, alive until the
            // stream has run the group (sends read them, receives write them).
            for &(peer, addr, bytes) in sends {
                unsafe { result::send(addr as *const _, bytes, byte, peer as i32, self.comm, stream) }?;
            }
            for &(peer, addr, bytes) in recvs {
                unsafe { result::recv(addr as *mut _, bytes, byte, peer as i32, self.comm, stream) }?;
            }
            Ok(())
        })();
        // The group is closed whatever happened inside it.
        let ended = result::group_end();
        queued.map_err(failed)?;
        ended.map_err(failed)?;
        Ok(())
    }
}

impl Drop for RankComm {
    fn drop(&mut self) {
        // SAFETY: the communicator this rank joined, not used after.
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}
