//! Parts of a kernel that a `DSV3_*_PROBE` switch compiles out, so the rest can be timed alone
//! (BENCHMARKS.md: "Routed experts at prefill", the MLA decode's fixed cost). For benchmarks
//! only: any of them makes the kernel's results wrong. Each probe names its parts and the
//! definition that switches each off in the kernel's source (0 in service); the definitions join
//! the NVRTC options, so the kernel cache keeps probed builds apart.

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
    ],
    source: include_str!("kernels/mla.cu"),
};

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
