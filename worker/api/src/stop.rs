//! Text-level stop strings: finds them across token boundaries and never releases text that may
//! turn out to be the start of one.

/// Watches generated text for stop strings.
///
/// Text goes in with [`push`](Self::push) as the detokenizer produces it; what comes out is safe
/// to send to the client: it contains no stop string and does not end with a proper prefix of
/// one (that tail is held back until the next push shows whether it completes a stop string).
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// The result of [`StopMatcher::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum StopScan {
    /// No stop string yet; this text can be released.
    Continue(String),
    /// A stop string matched: release this text (everything before it) and stop generating.
    Hit(String),
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan::Continue(text.to_string());
        }
        self.held.push_str(text);
        // The earliest occurrence of any stop string wins.
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let released = self.held[..at].to_string();
            self.held.clear();
            return StopScan::Hit(released);
        }
        let keep = self.held_back_len();
        let cut = self.held.len() - keep;
        let released = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopScan::Continue(released)
    }

    /// Releases the held-back text (generation ended without a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn held_back_len(&self) -> usize {
        let held = self.held.as_bytes();
        let mut best = 0;
        for stop in &self.stops {
            let stop = stop.as_bytes();
            let longest = (stop.len() - 1).min(held.len());
            for k in (best + 1..=longest).rev() {
                let start = held.len() - k;
                if self.held.is_char_boundary(start) && held[start..] == stop[..k] {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopScan::Continue(t) => out.push_str(&t),
                StopScan::Hit(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn stop_within_one_piece() {
        assert_eq!(run(&["STOP"], &["hello STOP there"]), ("hello ".into(), true));
    }

    #[test]
    fn stop_across_pieces() {
        assert_eq!(run(&["world"], &["hello wo", "r", "ld!"]), ("hello ".into(), true));
    }

    #[test]
    fn held_text_released_when_no_match() {
        let mut m = StopMatcher::new(vec!["abc".into()]);
        assert_eq!(m.push("xab"), StopScan::Continue("x".into()));
        assert_eq!(m.push("d"), StopScan::Continue("abd".into()));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn flush_releases_partial_prefix() {
        assert_eq!(run(&["abc"], &["xx", "ab"]), ("xxab".into(), false));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(run(&["b", "a"], &["xab"]), ("x".into(), true));
        assert_eq!(run(&["bc", "cd"], &["abcd"]), ("a".into(), true));
    }

    #[test]
    fn multibyte_prefixes() {
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&["日本"], &["x日", "y"]), ("x日y".into(), false));
    }

    #[test]
    fn empty_stop_ignored() {
        assert_eq!(run(&[""], &["abc"]), ("abc".into(), false));
    }
}
