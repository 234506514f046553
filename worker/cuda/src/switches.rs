//! The switches of the CUDA backend read from the environment (`DSV3_*`): a value that is set
//! but is not what the switch takes (a whole number, or 0 / 1 for an on-off switch) is an error
//! naming the variable, never a silent default.

use anyhow::{bail, Result};

/// The whole number `var` holds, `None` when it is unset.
pub fn count(var: &str) -> Result<Option<usize>> {
    match std::env::var(var) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => bail!("{var}={v:?}: expected a whole number"),
        Ok(v) => parse_count(var, &v).map(Some),
    }
}

/// The count `var` holds, 1 or more, or `default` when it is unset; read once per process and
/// kept in `cell` (a switch must not change between the steps it shapes).
pub fn positive_count_once(
    cell: &'static std::sync::OnceLock<Result<usize, String>>,
    var: &str,
    default: usize,
) -> Result<usize> {
    cell.get_or_init(|| match count(var) {
        Ok(None) => Ok(default),
        Ok(Some(n)) if n > 0 => Ok(n),
        Ok(Some(_)) => Err(format!("{var}=0: expected a count of 1 or more")),
        Err(e) => Err(e.to_string()),
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Whether the on-off switch `var` is on: `default` when it is unset, and otherwise 1 (on) or 0
/// (off) and nothing else.
pub fn flag(var: &str, default: bool) -> Result<bool> {
    match std::env::var(var) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(std::env::VarError::NotUnicode(v)) => bail!("{var}={v:?}: expected 0 or 1"),
        Ok(v) => parse_flag(var, &v),
    }
}

fn parse_flag(var: &str, value: &str) -> Result<bool> {
    match value.trim() {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => bail!("{var}={value}: expected 0 or 1"),
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
    use super::{flag, parse_count, parse_flag, positive_count_once};
    use std::sync::OnceLock;

    #[test]
    fn a_count_is_a_whole_number_and_anything_else_names_the_variable() {
        assert_eq!(parse_count("DSV3_X", "17").unwrap(), 17);
        assert_eq!(parse_count("DSV3_X", " 0 ").unwrap(), 0);
        for bad in ["", "-1", "1.5", "many", "17k"] {
            let err = parse_count("DSV3_X", bad).unwrap_err().to_string();
            assert!(err.contains("DSV3_X") && err.contains("whole number"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn an_on_off_switch_takes_0_or_1_and_anything_else_names_the_variable() {
        assert!(parse_flag("DSV3_X", "1").unwrap());
        assert!(!parse_flag("DSV3_X", " 0 ").unwrap());
        for bad in ["", "2", "on", "true", "yes", "01x"] {
            let err = parse_flag("DSV3_X", bad).unwrap_err().to_string();
            assert!(err.contains("DSV3_X") && err.contains("0 or 1"), "{bad:?}: {err}");
        }
        // Unset: the default, whichever it is (a variable no other test reads).
        assert!(flag("DSV3_TEST_FLAG_UNSET", true).unwrap());
        assert!(!flag("DSV3_TEST_FLAG_UNSET", false).unwrap());
    }

    #[test]
    fn a_positive_count_is_read_once_defaults_when_unset_and_refuses_zero() {
        // Variables no other test reads, as tests share the process's environment.
        static UNSET: OnceLock<Result<usize, String>> = OnceLock::new();
        assert_eq!(positive_count_once(&UNSET, "DSV3_TEST_ONCE_UNSET", 128).unwrap(), 128);

        static ZERO: OnceLock<Result<usize, String>> = OnceLock::new();
        std::env::set_var("DSV3_TEST_ONCE_ZERO", "0");
        let err = positive_count_once(&ZERO, "DSV3_TEST_ONCE_ZERO", 128)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("DSV3_TEST_ONCE_ZERO=0") && err.contains("1 or more"),
            "{err}"
        );

        static SET: OnceLock<Result<usize, String>> = OnceLock::new();
        std::env::set_var("DSV3_TEST_ONCE_SET", "64");
        assert_eq!(positive_count_once(&SET, "DSV3_TEST_ONCE_SET", 128).unwrap(), 64);
        std::env::set_var("DSV3_TEST_ONCE_SET", "256");
        assert_eq!(
            positive_count_once(&SET, "DSV3_TEST_ONCE_SET", 128).unwrap(),
            64,
            "read once"
        );
    }
}
