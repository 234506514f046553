//! The dense products alone (`bench-cuda --configs dense`): each of DeepSeek-V3's dense weight
//! matrices (FP8 with 128×128 block scales) at decode batch sizes, on the path the model takes
//! ([`linear`]: with quantised activations, our tensor-core kernels below cuBLASLt's threshold,
//! bf16 and, on Hopper, e4m3 ([`SmallBatch`]), and cuBLASLt from there; the activations'
//! quantisation and the split-k sum included). Each figure
//! stands next to its floor, the weights read once at the read-stream rate, and next to cuBLASLt's
//! block-scaled FP8 product of the same shape in the same run (quantisation included, as the
//! model would run it), at the fewest rows it takes where it takes fewer rows than asked.
//! Products run back to back in one CUDA graph, as in a decode step, over copies of the weights
//! that together exceed L2, so each reads its weights from HBM as in the model.

use crate::bench::graphed_seconds;
use crate::bench_attention::read_stream_rate;
use crate::fp8_gemm::{Fp8Gemm, QuantizedRows};
use crate::gpu::{DeviceBuf, Gpu};
use crate::linear::{linear, SmallBatch, TC_MAX_ROWS};
use crate::weights::{DeviceMatrix, Format};
use anyhow::{ensure, Result};

/// DeepSeek-V3's dense products: (name, output rows n, input columns k, weight format). The
/// head is the one bf16 matrix (no cuBLASLt FP8 peer).
const PRODUCTS: &[(&str, usize, usize, Format)] = &[
    ("q_a + kv_a", 1536 + 576, 7168, Format::Fp8),
    ("q_b", 128 * 192, 1536, Format::Fp8),
    ("o_proj", 7168, 128 * 128, Format::Fp8),
    ("shared gate + up", 2 * 2048, 7168, Format::Fp8),
    ("shared down", 7168, 2048, Format::Fp8),
    ("dense gate + up", 2 * 18432, 7168, Format::Fp8),
    ("dense down", 7168, 18432, Format::Fp8),
    ("head (bf16)", 129280, 7168, Format::Bf16),
];

/// Weights streamed per timed run: enough copies of a matrix that they cannot all sit in L2.
const STREAMED_BYTES: usize = 512 << 20;
/// Products per timed run (back to back, as in a step).
const PER_RUN: usize = 32;

/// The markdown table for `batches` rows, `reps` timed runs each; activations quantised with
/// power-of-two scales when `ue8m0`.
pub fn run(g: &Gpu, batches: &[usize], reps: usize, ue8m0: bool) -> Result<String> {
    let max_rows = batches.iter().copied().max().unwrap_or(1);
    ensure!(
        max_rows <= TC_MAX_ROWS,
        "the dense-product benchmark takes batches up to {TC_MAX_ROWS} rows"
    );
    let read = read_stream_rate(g)?;
    eprintln!("{}: read stream {:.0} GB/s", g.name, read / 1e9);
    let fp8 = g.fp8_gemm()?;
    let mut table = format!(
        "Dense FP8 products alone (DeepSeek-V3's shapes, activations quantised per 128 channels), read stream {:.0} GB/s in this run\n\n\
         | product | n × k | weight MB | batch | dsv3 kernel | dsv3 µs | GB/s | % of read stream | floor µs | cuBLASLt rows | cuBLASLt µs | dsv3 vs cuBLASLt |\n\
         |---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
        read / 1e9
    );
    // Unused at these batch sizes (no product is dequantised to bf16 below TC_MAX_ROWS rows).
    let dequant = g.alloc(2)?;
    for (p, &(name, n, k, format)) in PRODUCTS.iter().enumerate() {
        let first = DeviceMatrix::random(g, n, k, format, 100 + p as u64)?;
        let copies = STREAMED_BYTES.div_ceil(first.bytes()).max(1);
        let mut weights = vec![first];
        for c in 1..copies {
            weights.push(DeviceMatrix::random(g, n, k, format, 100 + (p * 64 + c) as u64)?);
        }
        let x = random_rows(g, max_rows.next_multiple_of(8), k)?;
        let y = g.alloc(max_rows.next_multiple_of(8) * n * 4)?;
        let bytes = weights[0].bytes() as f64;
        for &m in batches {
            // cuBLASLt takes rows in multiples of 4, and not a single row.
            let peer_rows = m.next_multiple_of(4).max(8);
            let peer = match fp8 {
                Some(fp8) if format == Format::Fp8 && Fp8Gemm::takes_weight(n, k) => {
                    fp8.reserve(g, 0)?;
                    Some(per_product(g, reps, |i| {
                        let w = &weights[i % copies];
                        let q = QuantizedRows::new(g, x.addr, k, None, peer_rows, k, None, ue8m0)?;
                        fp8.gemm(
                            g,
                            y.addr,
                            n,
                            q.data.addr,
                            q.scales.addr,
                            w.data.addr,
                            w.scale_addr(),
                            peer_rows,
                            n,
                            k,
                            false,
                        )
                    })?)
                }
                _ => None,
            };
            // Our small-batch kernels, where the model would use them; cuBLASLt itself above.
            let on_cublaslt = peer.is_some() && fp8.is_some_and(|f| m >= f.dense_min_rows);
            let kernels: &[(SmallBatch, &str)] = if format == Format::Bf16 && m <= 16 {
                &[(SmallBatch::E4m3Mma, "mma, bf16 weights")]
            } else if format == Format::Bf16 {
                &[(SmallBatch::E4m3Mma, "cuBLAS bf16 (the model's path)")]
            } else if on_cublaslt {
                &[(SmallBatch::Bf16Mma, "cuBLASLt (the model's path)")]
            } else if g.hopper {
                &[(SmallBatch::Bf16Mma, "mma, bf16"), (SmallBatch::E4m3Mma, "mma, e4m3")]
            } else {
                &[(SmallBatch::Bf16Mma, "mma, bf16")]
            };
            for &(small, label) in kernels {
                let ours = per_product(g, reps, |i| {
                    linear(
                        g,
                        &dequant,
                        small,
                        Some(ue8m0),
                        y.addr,
                        n,
                        x.addr,
                        m,
                        &weights[i % copies],
                        false,
                    )
                })?;
                eprintln!("dense {name} batch {m} {label}: {:.1} µs", ours * 1e6);
                let (peer_rows, peer_us, ratio) = match peer {
                    Some(s) => (
                        peer_rows.to_string(),
                        format!("{:.1}", s * 1e6),
                        format!("{:.2}×", s / ours),
                    ),
                    None => ("–".into(), "–".into(), "–".into()),
                };
                table += &format!(
                    "| {name} | {n} × {k} | {:.1} | {m} | {label} | {:.1} | {:.0} | {:.0}% | {:.1} | {peer_rows} | {peer_us} | {ratio} |\n",
                    bytes / 1e6,
                    ours * 1e6,
                    bytes / ours / 1e9,
                    100.0 * bytes / ours / read,
                    bytes / read * 1e6,
                );
            }
        }
    }
    table += "\n\"dsv3 vs cuBLASLt\" is cuBLASLt's time over ours: above 1× ours is the faster.\n";
    Ok(table)
}

/// Seconds per product: the median over `reps` runs of [`PER_RUN`] products back to back in one
/// graph (`product(i)` for the i-th), after one run to warm up.
fn per_product(g: &Gpu, reps: usize, product: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    graphed_seconds(g, PER_RUN, reps, product)
}

/// `rows` rows of `k` uniform values in [-1, 1).
fn random_rows(g: &Gpu, rows: usize, k: usize) -> Result<DeviceBuf> {
    let buf = g.alloc(rows * k * 4)?;
    crate::bench_attention::fill_random(g, crate::kernels::random_f32, &buf, rows * k, 7, -1.0, 1.0)?;
    Ok(buf)
}
