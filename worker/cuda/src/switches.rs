//! The numeric switches of the CUDA backend read from the environment (`DSV3_*`): a value that
//! is set but is not a whole number is an error naming the variable, never a silent default.

use anyhow::{bail, Result};

/// The whole number `var` holds, `None` when it is unset.
pub fn count(var: &str) -> Result<Option<usize>> {
    match std::env::var(var) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => bail!("{var}={v:?}: expected a whole number"),
        Ok(v) => parse_count(var, &v).map(Some),
    }
}

fn parse_count(var: &str, value: &str) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(n) => Ok(n),
        Err(_) => bail!("{var}={value}: expected a whole number"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_count;

    #[test]
    fn a_count_is_a_whole_number_and_anything_else_names_the_variable() {
        assert_eq!(parse_count("DSV3_X", "17").unwrap(), 17);
        assert_eq!(parse_count("DSV3_X", " 0 ").unwrap(), 0);
        for bad in ["", "-1", "1.5", "many", "17k"] {
            let err = parse_count("DSV3_X", bad).unwrap_err().to_string();
            assert!(err.contains("DSV3_X") && err.contains("whole number"), "{bad:?}: {err}");
        }
    }
}
