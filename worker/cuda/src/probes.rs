//! Parts of a kernel that a `DSV3_*_PROBE` switch compiles out, so the rest can be timed alone
//! (BENCHMARKS.md: "Routed experts at prefill", the MLA decode's fixed cost). For benchmarks
//! only: switching a part off makes the kernel's results wrong. Each probe names its parts and
//! the definition that switches each off in the kernel's source (0 in service); the definitions
//! join the NVRTC options, so the kernel cache keeps probed builds apart. One part switches
//! something on instead: the MLA decode's `timeline`, a clock reading at each step of every
//! block ([`timeline_table`]), with the results unchanged.

use anyhow::{anyhow, bail, Result};

/// One kernel's probe: the variable that asks for it and its parts, (name, definition).
pub struct Probe {
    pub var: &'static str,
    pub parts: &'static [(&'static str, &'static str)],
    /// The kernel source that reads the definitions.
    pub source: &'static str,
}

/// The routed experts' product, `grouped_fp8_wgmma`.
pub const EXPERT: Probe = Probe {
    var: "DSV3_EXPERT_PROBE",
    parts: &[
        ("weight-tiles", "GX_PROBE_WEIGHT_TILES"), // copied for the first stages only
        ("token-tiles", "GX_PROBE_TOKEN_TILES"),   // the same for the token tiles
        ("token-scales", "GX_PROBE_TOKEN_SCALES"), // the promotion multiplies by the block scale only
        ("promotion", "GX_PROBE_PROMOTION"),       // no promotion; the products still run
    ],
    source: include_str!("kernels/moe_wgmma.cu"),
};

/// The MLA decode on wgmma, `mla_decode_wgmma`: what a block does besides its tiles' products.
pub const MLA_DECODE: Probe = Probe {
    var: "DSV3_MLA_PROBE",
    parts: &[
        ("load-q", "MLA_PROBE_LOAD_Q"), // the query rows are not loaded (shared memory as it was)
        ("tiles", "MLA_PROBE_TILES"),   // the cache tiles are not copied (the waits still pass)
        ("scores", "MLA_PROBE_SCORES"), // no Q·Kᵀ products (the scores are zero)
        ("pv", "MLA_PROBE_PV"),         // no P·V products
        ("finish", "MLA_PROBE_FINISH"), // the outputs are not written (the products are kept)
        ("timeline", "MLA_PROBE_TIMELINE"), // nothing off: each block's clock at MLA_TIMELINE's points
    ],
    source: include_str!("kernels/mla.cu"),
};

/// The points of `mla_decode_wgmma` where its timeline probe reads the clock, in the kernel's
/// order (`mla_stamp` in kernels/mla.cu; the kernel's `MLA_TIMELINE_POINTS` is their number).
pub const MLA_TIMELINE: [&str; 10] = [
    "entry",
    "kernel before done",
    "prologue",
    "query loaded",
    "tile 0 in",
    "scores 0",
    "softmax 0",
    "P·V 0",
    "last tile",
    "outputs written",
];

/// The parts of `mla_decode_wgmma`'s tile loop whose cycles its timeline probe adds up over all
/// of a block's tiles, as warpgroup 0 (thread 0) spends them: waiting for tiles, scoring (with
/// the other group's products queued beside), its softmax and the handoffs (waiting for the other
/// group's maxima), waiting for its P·V (`MlaLaps` in kernels/mla.cu, `MLA_TIMELINE_LAPS` their
/// number).
pub const MLA_TIMELINE_LAPS: [&str; 4] = ["tile waits", "scores", "softmax and handoffs", "P·V"];

/// The `__device__` array the MLA decode's timeline probe writes (kernels/mla.cu).
pub const MLA_TIMELINE_RECORD: &str = "mla_timeline";

/// Whether the environment asks for the MLA decode's timeline.
pub fn mla_timeline_on() -> Result<bool> {
    Ok(MLA_DECODE.options()?.iter().any(|o| o == "-DMLA_PROBE_TIMELINE=1"))
}

/// The table of a timeline probe's record: for each block a row of `points.len()` SM clock
/// readings (0 where the block did not pass that point, as an empty split passes only the first
/// two and the last), the global timer in ns at its first and last point, then the cycles of
/// each of `laps` summed over the block's tiles; rows of blocks that did not run are all zero.
/// Each step between consecutive points, over the blocks that passed both, and each lap over
/// the blocks with tiles: median and slowest in µs, at the clock rate the record itself gives
/// (clock cycles against global time from first to last point, summed over the blocks).
pub fn timeline_table(kernel: &str, record: &[u64], points: &[&str], laps: &[&str]) -> Result<String> {
    let width = points.len() + 2 + laps.len();
    if points.len() < 3 || !record.len().is_multiple_of(width) {
        bail!(
            "a timeline record of {} values is not rows of {} points, two timer readings and {} laps",
            record.len(),
            points.len(),
            laps.len()
        );
    }
    let (entry_ns, end_ns) = (points.len(), points.len() + 1);
    let last = points.len() - 1;
    let rows: Vec<&[u64]> = record.chunks(width).filter(|r| r[0] != 0 && r[last] != 0).collect();
    if rows.is_empty() {
        bail!("the timeline of `{kernel}` is empty: no block recorded its first and last points");
    }
    let (cycles, nanos) = rows.iter().fold((0u64, 0u64), |(c, n), r| {
        (
            c + r[last].wrapping_sub(r[0]),
            n + r[end_ns].saturating_sub(r[entry_ns]),
        )
    });
    if cycles == 0 || nanos == 0 {
        bail!("the timeline of `{kernel}` spans no time");
    }
    let us_per_cycle = nanos as f64 / cycles as f64 / 1e3;
    let first_entry = rows.iter().map(|r| r[entry_ns]).min().unwrap_or(0);
    let last_end = rows.iter().map(|r| r[end_ns]).max().unwrap_or(0);
    let mut entries: Vec<f64> = rows.iter().map(|r| (r[entry_ns] - first_entry) as f64 / 1e3).collect();
    let empty = rows.iter().filter(|r| r[2] == 0).count();
    let mut table = format!(
        "Timeline of `{kernel}`: {} blocks ({empty} with no positions), first entry to last end {:.1} µs,          entries spread over {:.1} µs (median {:.1}), SM clock {:.2} GHz over the record

         | step | blocks | median µs | slowest µs |
|---|---:|---:|---:|
",
        rows.len(),
        (last_end - first_entry) as f64 / 1e3,
        quantile(&mut entries, 1.0),
        quantile(&mut entries, 0.5),
        1e-3 / us_per_cycle,
    );
    for (i, name) in points.iter().enumerate().skip(1) {
        let mut steps: Vec<f64> = rows
            .iter()
            .filter(|r| r[i - 1] != 0 && r[i] != 0)
            .map(|r| r[i].wrapping_sub(r[i - 1]) as f64 * us_per_cycle)
            .collect();
        if !steps.is_empty() {
            table += &format!(
                "| {} → {name} | {} | {:.2} | {:.2} |\n",
                points[i - 1],
                steps.len(),
                quantile(&mut steps, 0.5),
                quantile(&mut steps, 1.0)
            );
        }
    }
    let mut whole: Vec<f64> = rows
        .iter()
        .filter(|r| r[2] != 0 || empty == rows.len())
        .map(|r| r[last].wrapping_sub(r[0]) as f64 * us_per_cycle)
        .collect();
    table += &format!(
        "| {} → {} | {} | {:.2} | {:.2} |\n",
        points[0],
        points[last],
        whole.len(),
        quantile(&mut whole, 0.5),
        quantile(&mut whole, 1.0)
    );
    for (i, lap) in laps.iter().enumerate() {
        let mut spent: Vec<f64> = rows
            .iter()
            .filter(|r| r[2] != 0)
            .map(|r| r[end_ns + 1 + i] as f64 * us_per_cycle)
            .collect();
        if !spent.is_empty() {
            table += &format!(
                "| every tile: {lap} | {} | {:.2} | {:.2} |\n",
                spent.len(),
                quantile(&mut spent, 0.5),
                quantile(&mut spent, 1.0)
            );
        }
    }
    Ok(table)
}

/// The `q` quantile of `v` (0: least, 1: greatest), by the nearest rank.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Every probe.
pub const ALL: [&Probe; 2] = [&EXPERT, &MLA_DECODE];

impl Probe {
    /// The `-D` options for a comma-separated list of part names (empty: none); an unknown name
    /// is an error that lists the known ones.
    pub fn defines(&self, list: &str) -> Result<Vec<String>> {
        let mut defines = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let Some((_, define)) = self.parts.iter().find(|(known, _)| *known == name) else {
                let known: Vec<&str> = self.parts.iter().map(|(n, _)| *n).collect();
                bail!("{}: unknown part `{name}` (known: {})", self.var, known.join(", "));
            };
            let option = format!("-D{define}=1");
            if !defines.contains(&option) {
                defines.push(option);
            }
        }
        Ok(defines)
    }

    /// The `-D` options its variable asks for (none when it is unset or empty).
    pub fn options(&self) -> Result<Vec<String>> {
        let Some(list) = std::env::var_os(self.var) else {
            return Ok(Vec::new());
        };
        let list = list.into_string().map_err(|_| anyhow!("{} is not UTF-8", self.var))?;
        self.defines(&list)
    }
}

/// The `-D` options of every probe the environment asks for, and the variables that asked.
pub fn options() -> Result<(Vec<String>, Vec<&'static str>)> {
    let (mut options, mut asked) = (Vec::new(), Vec::new());
    for probe in ALL {
        let defines = probe.options()?;
        if !defines.is_empty() {
            asked.push(probe.var);
        }
        options.extend(defines);
    }
    Ok((options, asked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_names_map_to_their_definitions_and_unknown_ones_are_refused() {
        assert!(EXPERT.defines("").unwrap().is_empty());
        assert_eq!(
            EXPERT.defines("weight-tiles,token-tiles").unwrap(),
            ["-DGX_PROBE_WEIGHT_TILES=1", "-DGX_PROBE_TOKEN_TILES=1"]
        );
        assert_eq!(
            EXPERT.defines(" promotion , token-scales ,promotion").unwrap(),
            ["-DGX_PROBE_PROMOTION=1", "-DGX_PROBE_TOKEN_SCALES=1"]
        );
        let err = EXPERT.defines("weight-tiles,loads").unwrap_err().to_string();
        assert!(
            err.contains("DSV3_EXPERT_PROBE") && err.contains("`loads`") && err.contains("token-scales"),
            "{err}"
        );
        let err = MLA_DECODE.defines("finish,softmax").unwrap_err().to_string();
        assert!(
            err.contains("DSV3_MLA_PROBE") && err.contains("`softmax`") && err.contains("load-q"),
            "{err}"
        );
    }

    /// A block's timeline row: clock readings (0: point not passed), then its global entry time in
    /// ns and its end at a clock of `ghz`, then its laps' cycles.
    fn block(clocks: &[u64], entry_ns: u64, ghz: f64, laps: &[u64]) -> Vec<u64> {
        let first = clocks[0];
        let last = *clocks.last().unwrap();
        let mut row = clocks.to_vec();
        row.extend([entry_ns, entry_ns + ((last - first) as f64 / ghz) as u64]);
        row.extend(laps);
        row
    }

    #[test]
    fn a_timeline_gives_each_step_at_the_clock_rate_of_its_own_record() {
        let (points, laps) = (["entry", "waited", "loaded", "end"], ["a", "b"]);
        // At 2 GHz: a block that waits 1 µs, loads 3 µs and ends 1 µs later; one 2 µs later whose
        // load takes 5 µs; an empty split (no load); a block that never ran. The two with tiles
        // spent 0.5 and 1.5 µs in lap a, 2 and 4 µs in lap b.
        let mut record = block(&[10_000, 12_000, 18_000, 20_000], 1_000, 2.0, &[1_000, 4_000]);
        record.extend(block(&[50_000, 52_000, 62_000, 64_000], 3_000, 2.0, &[3_000, 8_000]));
        record.extend(block(&[7_000, 9_000, 0, 9_400], 1_500, 2.0, &[0, 0]));
        record.extend([0; 8]);
        let table = timeline_table("k", &record, &points, &laps).unwrap();
        assert!(table.contains("3 blocks (1 with no positions)"), "{table}");
        assert!(table.contains("SM clock 2.00 GHz"), "{table}");
        assert!(table.contains("entries spread over 2.0 µs (median 0.5)"), "{table}");
        assert!(table.contains("first entry to last end 9.0 µs"), "{table}");
        assert!(table.contains("| entry → waited | 3 | 1.00 | 1.00 |"), "{table}");
        // Median of two by the nearest rank: the greater.
        assert!(table.contains("| waited → loaded | 2 | 5.00 | 5.00 |"), "{table}");
        assert!(table.contains("| loaded → end | 2 | 1.00 | 1.00 |"), "{table}");
        assert!(table.contains("| entry → end | 2 | 7.00 | 7.00 |"), "{table}");
        assert!(table.contains("| every tile: a | 2 | 1.50 | 1.50 |"), "{table}");
        assert!(table.contains("| every tile: b | 2 | 4.00 | 4.00 |"), "{table}");
        // Against the wrong number of points, and with nothing recorded: errors, not a table.
        assert!(timeline_table("k", &record, &points[..3], &laps).is_err());
        let err = timeline_table("k", &[0; 16], &points, &laps).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn the_timeline_points_are_the_kernels() {
        let source = MLA_DECODE.source;
        assert!(
            source.contains(&format!("#define MLA_TIMELINE_POINTS {}", MLA_TIMELINE.len())),
            "kernels/mla.cu and MLA_TIMELINE disagree on the number of points"
        );
        assert!(
            source.contains(&format!("#define MLA_TIMELINE_LAPS {}", MLA_TIMELINE_LAPS.len())),
            "kernels/mla.cu and MLA_TIMELINE_LAPS disagree on the number of laps"
        );
        for lap in 0..MLA_TIMELINE_LAPS.len() {
            assert!(
                source.contains(&format!("laps.lap({lap})")),
                "no laps.lap({lap}) in kernels/mla.cu"
            );
        }
        for point in 0..MLA_TIMELINE.len() - 1 {
            assert!(
                source.contains(&format!("mla_stamp({point})")) || source.contains(&format!("mla_stamp({point}, ")),
                "no mla_stamp({point}) in kernels/mla.cu"
            );
        }
        assert!(source.contains("mla_stamp(MLA_TIMELINE_POINTS - 1)"));
        assert!(source.contains(&format!("__device__ u64 {MLA_TIMELINE_RECORD}[")));
    }

    #[test]
    fn every_definition_is_one_its_kernel_reads() {
        for probe in ALL {
            for (_, define) in probe.parts {
                assert!(
                    probe.source.contains(&format!("#ifndef {define}")),
                    "{}: {define}",
                    probe.var
                );
            }
        }
    }
}
