//! The MLA attention kernels alone. Decode (`dsv3-worker bench-cuda --configs mla`): one layer's
//! absorbed attention over a random bf16 latent cache at several batches, beside the read-stream
//! rate measured in the same run and FlashMLA's published figures; and the random inputs with
//! which the GPU tests check the kernels against a float64 reference. Prefill (`--configs
//! mla_prefill --prefill N`): one layer's causal attention in the naive form over an N-token
//! prompt, beside torch's scaled-dot-product attention on the same shapes when its result is given.

use crate::bench::{graphed_seconds, median};
use crate::gpu::{DeviceBuf, Gpu};
use crate::kernels;
use crate::launch::ptr;
use crate::mla_decode::{mla_decode, DecodeBuffers, DecodeKernel, DecodeOutput, DecodeQuery, LatentShape, PagedRows};
use crate::mla_prefill::{prefill_with, PrefillBuffers, PrefillKernel, PrefillOutput, PrefillShape};
use anyhow::{ensure, Context, Result};

/// DeepSeek-V3's latent attention: 128 heads, latent rank 512, rotary 64, 128 without rotary.
pub const V3_SHAPE: LatentShape = LatentShape {
    heads: 128,
    lora: 512,
    rope: 64,
    qk: 192,
    nope: 128,
};

/// One decode step's attention inputs on the GPU: rows of the given lengths over a paged cache
/// whose blocks are dealt out of order (a row's positions are not contiguous), cache entries in
/// [-1, 1), queries in [-3, 3).
pub struct AttentionCase {
    pub shape: LatentShape,
    pub lens: Vec<usize>,
    pub block: usize,
    pub scale: f32,
    /// Every row's block table, concatenated; row `r`'s starts at `offsets[r]`.
    tables: Vec<i32>,
    offsets: Vec<i32>,
    cache: DeviceBuf,
    q_lat: DeviceBuf,
    q: DeviceBuf,
    /// The queries as bf16, made once, for the kernels that read them so.
    q_lat_bf16: DeviceBuf,
    q_bf16: DeviceBuf,
    o_lat: DeviceBuf,
    o_lat_bf16: DeviceBuf,
    tables_d: DeviceBuf,
    offsets_d: DeviceBuf,
    lens_d: DeviceBuf,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Fills `n` elements of `buf` with uniform values in [lo, hi) by `kernel` (`random_bf16`, `random_f32`).
pub fn fill_random(
    g: &Gpu,
    kernel: kernels::RandomF32,
    buf: &DeviceBuf,
    n: usize,
    seed: u64,
    lo: f32,
    hi: f32,
) -> Result<()> {
    kernel.launch_1d(g, n, (ptr(buf.addr), n as u64, seed, lo, hi))
}

impl AttentionCase {
    pub fn random(g: &Gpu, shape: LatentShape, lens: &[usize], block: usize, seed: u64) -> Result<Self> {
        ensure!(
            !lens.is_empty() && block > 0,
            "an attention case needs rows and a block size"
        );
        let per_row: Vec<usize> = lens.iter().map(|l| l.div_ceil(block).max(1)).collect();
        let total: usize = per_row.iter().sum();
        // a permutation of the blocks: i -> (i * stride + 3) mod total, stride coprime with total
        let stride = (total / 2 + 1..=total + 1).find(|&s| gcd(s, total) == 1).unwrap_or(1);
        let tables: Vec<i32> = (0..total).map(|i| ((i * stride + 3) % total) as i32).collect();
        let offsets: Vec<i32> = per_row
            .iter()
            .scan(0usize, |at, &n| {
                let start = *at;
                *at += n;
                Some(start as i32)
            })
            .collect();
        let rows = lens.len();
        let width = shape.width();
        let cache = g.alloc(total * block * width * 2)?;
        fill_random(g, kernels::random_bf16, &cache, total * block * width, seed, -1.0, 1.0)?;
        let q_lat = g.alloc(rows * shape.heads * shape.lora * 4)?;
        fill_random(
            g,
            kernels::random_f32,
            &q_lat,
            rows * shape.heads * shape.lora,
            seed + 1,
            -3.0,
            3.0,
        )?;
        let q = g.alloc(rows * shape.heads * shape.qk * 4)?;
        fill_random(
            g,
            kernels::random_f32,
            &q,
            rows * shape.heads * shape.qk,
            seed + 2,
            -3.0,
            3.0,
        )?;
        let lens_i32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        Ok(AttentionCase {
            shape,
            lens: lens.to_vec(),
            block,
            scale: 1.0 / (shape.qk as f32).sqrt(),
            tables_d: g.upload(&tables)?,
            offsets_d: g.upload(&offsets)?,
            lens_d: g.upload(&lens_i32)?,
            tables,
            offsets,
            cache,
            q_lat_bf16: g.to_bf16(q_lat.addr, rows * shape.heads * shape.lora)?,
            q_bf16: g.to_bf16(q.addr, rows * shape.heads * shape.qk)?,
            q_lat,
            q,
            o_lat: g.alloc(rows * shape.heads * shape.lora * 4)?,
            o_lat_bf16: g.alloc(rows * shape.heads * shape.lora * 2)?,
        })
    }

    /// Writes NaN into every cached slot past a row's length in the row's last block, as a real
    /// cache may hold anything there: a kernel must not let those slots reach its output.
    pub fn garbage_past_ends(&self, g: &Gpu) -> Result<()> {
        let row = vec![0x7FC0u16; self.shape.width()];
        for (r, &len) in self.lens.iter().enumerate() {
            for pos in len..len.div_ceil(self.block).max(1) * self.block {
                let slot =
                    self.tables[self.offsets[r] as usize + pos / self.block] as usize * self.block + pos % self.block;
                g.copy_to(&self.cache, slot * self.shape.width() * 2, &row)?;
            }
        }
        Ok(())
    }

    /// Runs the decode attention with `kernel`, its output f32 ([`Self::output`]) or, with
    /// `bf16_out`, bf16 ([`Self::output_bf16`]).
    pub fn run(&self, g: &Gpu, kernel: DecodeKernel, bf16_out: bool) -> Result<()> {
        let rows = PagedRows {
            rows: self.lens.len(),
            max_len: self.lens.iter().copied().max().unwrap_or(0),
            tables: self.tables_d.addr,
            table_off: self.offsets_d.addr,
            lens: self.lens_d.addr,
            block: self.block,
        };
        let query = if kernel.reads_bf16_query() {
            DecodeQuery::Bf16 {
                q_lat: self.q_lat_bf16.addr,
                q: self.q_bf16.addr,
            }
        } else {
            DecodeQuery::F32 {
                q_lat: self.q_lat.addr,
                q: self.q.addr,
            }
        };
        let bufs = DecodeBuffers {
            query,
            cache: self.cache.addr,
            cache_slots: self.cache.bytes / (self.shape.width() * 2),
            o_lat: if bf16_out {
                DecodeOutput::Bf16(self.o_lat_bf16.addr)
            } else {
                DecodeOutput::F32(self.o_lat.addr)
            },
        };
        mla_decode(g, &self.shape, &rows, &bufs, self.scale, kernel)
    }

    /// Fills both outputs with NaN, so that a run that leaves any of its output unwritten cannot
    /// pass for the run before it.
    pub fn poison_outputs(&self, g: &Gpu) -> Result<()> {
        g.copy_to(&self.o_lat, 0, &vec![f32::NAN; self.output_len()])?;
        g.copy_to(&self.o_lat_bf16, 0, &vec![0x7FC0u16; self.output_len()])
    }

    /// Values in `o_lat`: `[rows, heads, lora]`.
    fn output_len(&self) -> usize {
        self.lens.len() * self.shape.heads * self.shape.lora
    }

    /// The last f32 run's `o_lat`.
    pub fn output(&self, g: &Gpu) -> Result<Vec<f32>> {
        g.download(self.o_lat.addr, self.output_len())
    }

    /// The last bf16 run's `o_lat` (bf16 bits).
    pub fn output_bf16(&self, g: &Gpu) -> Result<Vec<u16>> {
        g.download(self.o_lat_bf16.addr, self.output_len())
    }

    /// `o_lat` in float64 from the inputs as the GPU holds them (bf16 cache, f32 queries).
    pub fn reference(&self, g: &Gpu) -> Result<Vec<f64>> {
        let LatentShape {
            heads,
            lora,
            rope,
            qk,
            nope,
        } = self.shape;
        let width = self.shape.width();
        let slots = self.tables.len() * self.block;
        let cache: Vec<u16> = g.download(self.cache.addr, slots * width)?;
        let cache: Vec<f64> = cache.iter().map(|&b| f32::from_bits((b as u32) << 16) as f64).collect();
        let rows = self.lens.len();
        let q_lat: Vec<f32> = g.download(self.q_lat.addr, rows * heads * lora)?;
        let q: Vec<f32> = g.download(self.q.addr, rows * heads * qk)?;
        let mut out = vec![0.0f64; rows * heads * lora];
        for (r, &len) in self.lens.iter().enumerate() {
            let slot = |p: usize| {
                let b = self.tables[self.offsets[r] as usize + p / self.block] as usize;
                b * self.block + p % self.block
            };
            for h in 0..heads {
                let ql = &q_lat[(r * heads + h) * lora..][..lora];
                let qp = &q[(r * heads + h) * qk + nope..][..rope];
                let scores: Vec<f64> = (0..len)
                    .map(|p| {
                        let c = &cache[slot(p) * width..][..width];
                        let dot: f64 = ql.iter().zip(c).map(|(&a, &b)| a as f64 * b).sum::<f64>()
                            + qp.iter().zip(&c[lora..]).map(|(&a, &b)| a as f64 * b).sum::<f64>();
                        dot * self.scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let o = &mut out[(r * heads + h) * lora..][..lora];
                for (p, w) in weights.iter().enumerate() {
                    let c = &cache[slot(p) * width..][..lora];
                    for (oc, &cv) in o.iter_mut().zip(c) {
                        *oc += w / total * cv;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Bytes a step of `kernel` must move: every cached latent once, the queries (their latent
    /// and rotary parts, bf16 or f32 as the kernel reads them), and the output written (bf16 with
    /// `bf16_out`, else f32).
    pub fn bytes(&self, kernel: DecodeKernel, bf16_out: bool) -> f64 {
        let positions: usize = self.lens.iter().sum();
        let rows = self.lens.len();
        let s = &self.shape;
        let query = if kernel.reads_bf16_query() { 2 } else { 4 };
        let output = if bf16_out { 2 } else { 4 };
        (positions * s.width() * 2 + rows * s.heads * ((s.lora + s.rope) * query + s.lora * output)) as f64
    }

    /// Tensor-core work: Q·Kᵀ over lora + rope and P·V over lora, per head and position.
    pub fn flops(&self) -> f64 {
        let positions: usize = self.lens.iter().sum();
        let s = &self.shape;
        (positions * s.heads * 2 * (s.width() + s.lora)) as f64
    }
}

/// Rate of a kernel that only reads (bytes per second), on a buffer far larger than L2.
pub fn read_stream_rate(g: &Gpu) -> Result<f64> {
    let bytes = 4usize << 30;
    let buf = g.alloc(bytes)?;
    fill_random(g, kernels::random_f32, &buf, bytes / 4, 9, -1.0, 1.0)?;
    let sink = g.alloc(4 * 4096)?;
    let read = || {
        kernels::read_stream.launch(
            g,
            (4 * g.sm_count as u32, 1, 1),
            1024,
            0,
            (ptr(buf.addr), (bytes / 16) as u64, ptr(sink.addr)),
        )
    };
    read()?;
    let times: Vec<f64> = (0..10).map(|_| g.time(read)).collect::<Result<_>>()?;
    Ok(bytes as f64 / median(times))
}

/// FlashMLA's published decode figures (H800 SXM5, its README): memory-bound and compute-bound.
pub const FLASH_MLA_GBPS: f64 = 3000.0;
pub const FLASH_MLA_TFLOPS: f64 = 660.0;

/// The table of `bench-cuda --configs mla`: each batch of `ctx`-position rows, DeepSeek-V3's shape.
/// Decode attentions per timed graph of `bench-cuda --configs mla`.
const GRAPHED_RUNS: usize = 16;

pub fn run(g: &Gpu, batches: &[usize], ctx: usize, reps: usize) -> Result<String> {
    let read = read_stream_rate(g)?;
    eprintln!("{}: read stream {:.0} GB/s", g.name, read / 1e9);
    let mut table = format!(
        "MLA decode kernel alone (DeepSeek-V3 shape: 128 heads, latent 512 + rotary 64, bf16 cache), read stream {:.0} GB/s in this run\n\n\
         | kernel | batch | ctx | µs | GB/s | % of read stream | TFLOP/s | memory floor µs | vs floor |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        read / 1e9
    );
    // Every kernel on the tensor cores (the CUDA-core one is far too slow to time here).
    let kernels: Vec<DecodeKernel> = DecodeKernel::ALL
        .into_iter()
        .filter(|&k| k != DecodeKernel::CudaCores && k.takes(g, &V3_SHAPE, 64))
        .collect();
    // DSV3_MLA_PROBE=timeline: each wgmma kernel's blocks in the last run of its graph.
    let timeline = crate::probes::mla_timeline_on()?;
    let mut timelines = String::new();
    for &b in batches {
        let case = AttentionCase::random(g, V3_SHAPE, &vec![ctx; b], 64, 11)?;
        for &kernel in &kernels {
            let record = match timeline && kernel.on_wgmma() {
                true => Some(timeline_record(g)?),
                false => None,
            };
            // Back to back in one graph, as in a decode step: timed one by one, the host's
            // launches (not the GPU) set the time of a batch-1 run. The output as the model has
            // it written: bf16 for the tensor-core absorption.
            let bf16_out = kernel.writes_bf16();
            let s = graphed_seconds(g, GRAPHED_RUNS, reps, |_| case.run(g, kernel, bf16_out))?;
            if let Some((addr, bytes)) = record {
                let stamps: Vec<u64> = g.download(addr, bytes / 8)?;
                timelines += &format!("\n{kernel:?}, batch {b}, {ctx} positions. ");
                timelines += &crate::probes::timeline_table(
                    "mla_decode_wgmma",
                    &stamps,
                    &crate::probes::MLA_TIMELINE,
                    &crate::probes::MLA_TIMELINE_LAPS,
                )?;
            }
            let bytes = case.bytes(kernel, bf16_out);
            let floor = bytes / read;
            eprintln!("mla decode {kernel:?} batch {b}: {:.1} µs", s * 1e6);
            table += &format!(
                "| {kernel:?} | {b} | {ctx} | {:.1} | {:.0} | {:.0}% | {:.0} | {:.1} | {:.2}× |\n",
                s * 1e6,
                bytes / s / 1e9,
                100.0 * bytes / s / read,
                case.flops() / s / 1e12,
                floor * 1e6,
                s / floor,
            );
        }
    }
    table += &format!(
        "\nFlashMLA's published figures (H800 SXM5): {FLASH_MLA_GBPS:.0} GB/s memory-bound, {FLASH_MLA_TFLOPS:.0} TFLOP/s compute-bound.\n"
    );
    Ok(table + &timelines)
}

/// The MLA decode's timeline record (a `DSV3_MLA_PROBE=timeline` build), zeroed for the next run.
fn timeline_record(g: &Gpu) -> Result<(u64, usize)> {
    let name = crate::probes::MLA_TIMELINE_RECORD;
    let (addr, bytes) = g
        .global(name)?
        .with_context(|| format!("DSV3_MLA_PROBE=timeline: the kernels have no `{name}`"))?;
    g.zero(addr, bytes)?;
    Ok((addr, bytes))
}

/// The table of `bench-cuda --configs mla_prefill`: one layer's causal attention over an `n`-token
/// prompt (DeepSeek-V3's naive form: 128 heads, query/key 192, value 128, bf16), on each kernel
/// that takes it, beside `peer` (worker/bench/hf_gpu_peer.py's `mla_prefill` row: torch's fastest
/// scaled-dot-product attention backend on the same shapes, same run).
pub fn run_prefill(g: &Gpu, n: usize, reps: usize, peer: Option<&serde_json::Value>) -> Result<String> {
    ensure!(n > 0, "the prefill attention benchmark needs --prefill > 0");
    let shape = PrefillShape {
        heads: V3_SHAPE.heads,
        nope: V3_SHAPE.nope,
        rope: V3_SHAPE.rope,
        vdim: 128,
    };
    let (heads, qk, vdim) = (shape.heads, shape.qk(), shape.vdim);
    let q = g.alloc(n * heads * qk * 2)?;
    let kv = g.alloc(n * heads * (shape.nope + vdim) * 2)?;
    let k_pe = g.alloc(n * shape.rope * 2)?;
    let out = g.alloc(n * heads * vdim * 4)?;
    fill_random(g, kernels::random_bf16, &q, n * heads * qk, 21, -2.0, 2.0)?;
    fill_random(
        g,
        kernels::random_bf16,
        &kv,
        n * heads * (shape.nope + vdim),
        22,
        -1.0,
        1.0,
    )?;
    fill_random(g, kernels::random_bf16, &k_pe, n * shape.rope, 23, -1.0, 1.0)?;
    let bufs = PrefillBuffers {
        q: q.addr,
        kv: kv.addr,
        k_pe: k_pe.addr,
        out: PrefillOutput::F32 {
            out: out.addr,
            ld: heads * vdim,
        },
    };
    // Causal: row i sees i + 1 keys; Q·Kᵀ over qk and P·V over vdim per head and key.
    let flops = (n * (n + 1) / 2 * heads * 2 * (qk + vdim)) as f64;
    let peer_ms = peer.and_then(|p| p["ms"].as_f64());
    let backend = peer.and_then(|p| p["backend"].as_str()).unwrap_or("-");
    let mut table = format!(
        "MLA prefill attention alone (naive form: {heads} heads, query/key {qk}, value {vdim}, bf16, causal), {n} tokens\n\n\
         | kernel | tokens | ms | TFLOP/s | torch ms ({backend}) | speed-up |\n|---|---:|---:|---:|---:|---:|\n"
    );
    let scale = 1.0 / (qk as f32).sqrt();
    for kernel in PrefillKernel::ALL {
        if !kernel.takes(g, &shape) {
            continue;
        }
        let run = || prefill_with(g, kernel, &shape, &bufs, n, 0, scale);
        for _ in 0..2 {
            run()?;
        }
        let times: Vec<f64> = (0..reps.max(1)).map(|_| g.time(run)).collect::<Result<_>>()?;
        let s = median(times);
        eprintln!("mla prefill {kernel:?} {n}: {:.3} ms", s * 1e3);
        let (peer_txt, speedup) = match peer_ms {
            Some(ms) => (format!("{ms:.3}"), format!("{:.2}×", ms / (s * 1e3))),
            None => ("-".into(), "-".into()),
        };
        table += &format!(
            "| {kernel:?} | {n} | {:.3} | {:.0} | {peer_txt} | {speedup} |\n",
            s * 1e3,
            flops / s / 1e12
        );
    }
    if let Some(ms) = peer_ms {
        table += &format!(
            "| torch ({backend}) | {n} | {ms:.3} | {:.0} | | |\n",
            flops / (ms / 1e3) / 1e12
        );
    }
    Ok(table)
}
