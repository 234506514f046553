//! Load progress on stderr: one line per step, at most a few per second.

use dsv3_engine::LoadProgress;
use std::time::Instant;

pub fn reporter(source: String) -> impl FnMut(LoadProgress) {
    let mut last_print: Option<Instant> = None;
    move |p: LoadProgress| {
        let due = last_print.is_none_or(|t| t.elapsed().as_millis() >= 250);
        if due || p.done == p.total {
            eprintln!(
                "loading {source}: {}/{} ({}) {:.1}s",
                p.done, p.total, p.stage, p.elapsed_s
            );
            last_print = Some(Instant::now());
        }
    }
}

/// Progress of a role's load, counted in finished layers (attention layers and expert layers).
pub fn layer_reporter(source: String, total: usize) -> impl FnMut(usize) {
    let started = Instant::now();
    let mut done = 0;
    let mut report = reporter(source);
    move |_layer| {
        done += 1;
        report(LoadProgress {
            stage: "layers",
            done: done.min(total),
            total,
            elapsed_s: started.elapsed().as_secs_f64(),
        });
    }
}
