//! `dsv3-worker generate` as a user runs it: the real binary on the golden checkpoints.

use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

fn reference(name: &str) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(golden().join(name)).expect("reference");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let ids = |n: &str| -> Vec<u32> {
        st.tensor(n)
            .expect(n)
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8")) as u32)
            .collect()
    };
    let logits: Vec<f32> = st
        .tensor("logits")
        .expect("logits")
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (ids("prompt_ids"), ids("greedy_ids"), logits)
}

fn generate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dsv3-worker"))
        .arg("generate")
        .args(args)
        .output()
        .expect("run dsv3-worker");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn join(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn json_output_matches_the_transformers_reference() {
    for (dir, reference_file) in [
        ("tiny-bf16", "tiny-bf16.ref.safetensors"),
        ("tiny-fp8", "tiny-fp8.ref.safetensors"),
    ] {
        let (prompt, greedy, logits) = reference(reference_file);
        let model = golden().join(dir);
        let (ok, stdout, stderr) = generate(&[
            "--model",
            model.to_str().expect("utf-8 path"),
            "--prompt-token-ids",
            &join(&prompt),
            "--max-tokens",
            "24",
            "--temperature",
            "0",
            "--json",
            "--ignore-eos",
        ]);
        assert!(ok, "{dir}: {stderr}");
        assert!(stderr.contains("loading"), "{dir}: load progress is reported on stderr");
        let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
        let ids: Vec<u32> = serde_json::from_value(json["token_ids"].clone()).expect("token_ids");
        assert_eq!(ids, greedy, "{dir}: greedy tokens");
        let last: Vec<f32> = serde_json::from_value(json["prompt_last_logits"].clone()).expect("prompt_last_logits");
        let vocab = logits.len() / prompt.len();
        assert_eq!(last.len(), vocab);
        let expected = &logits[(prompt.len() - 1) * vocab..];
        let diff = last
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 2e-3, "{dir}: prompt_last_logits differ by {diff}");
    }
}

#[test]
fn generation_stops_at_eos_unless_told_otherwise() {
    let (prompt, greedy, _) = reference("tiny-bf16.ref.safetensors");
    let model = golden().join("tiny-bf16");
    let (ok, stdout, stderr) = generate(&[
        "--model",
        model.to_str().expect("path"),
        "--prompt-token-ids",
        &join(&prompt),
        "--max-tokens",
        "24",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    let ids: Vec<u32> = serde_json::from_value(json["token_ids"].clone()).expect("ids");
    let eos_at = greedy.iter().position(|&t| t == 1).expect("the reference emits eos");
    assert_eq!(ids, greedy[..=eos_at]);
    assert_eq!(json["finish_reason"], "stop");
}

#[test]
fn the_embedded_default_is_the_tiny_fp8_checkpoint() {
    let (prompt, greedy, _) = reference("tiny-fp8.ref.safetensors");
    let (ok, stdout, stderr) = generate(&[
        "--prompt-token-ids",
        &join(&prompt),
        "--max-tokens",
        "24",
        "--json",
        "--ignore-eos",
    ]);
    assert!(ok, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    let ids: Vec<u32> = serde_json::from_value(json["token_ids"].clone()).expect("ids");
    assert_eq!(ids, greedy);
}

#[test]
fn text_and_chat_prompts_use_the_tokenizer() {
    let (ok, stdout, stderr) = generate(&[
        "--prompt",
        "Hello, world! 你好，世界。",
        "--max-tokens",
        "3",
        "--json",
        "--ignore-eos",
    ]);
    assert!(ok, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(json["token_ids"].as_array().map(Vec::len), Some(3));
    let (ok, _, stderr) = generate(&["--prompt", "Hi", "--chat", "--system", "Be brief.", "--max-tokens", "3"]);
    assert!(ok, "{stderr}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let (ok, _, stderr) = generate(&["--prompt-token-ids", "5,99999", "--max-tokens", "2"]);
    assert!(!ok);
    assert!(
        stderr.contains("token id 99999") && stderr.contains("vocabulary"),
        "{stderr}"
    );
    let (ok, _, stderr) = generate(&["--model", "/nonexistent/model", "--prompt-token-ids", "5"]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/model"), "{stderr}");
    let (ok, _, stderr) = generate(&["--prompt-token-ids", "5", "--temperature", "-1"]);
    assert!(!ok);
    assert!(stderr.contains("temperature"), "{stderr}");
    let (ok, _, stderr) = generate(&["--prompt-token-ids", "5", "--top-p", "0"]);
    assert!(!ok);
    assert!(stderr.contains("top_p"), "{stderr}");
    let (ok, _, _) = generate(&[]);
    assert!(!ok);
}

#[test]
fn same_seed_same_sample() {
    let run = |seed: &str| {
        let (ok, stdout, stderr) = generate(&[
            "--prompt-token-ids",
            "5,6,7",
            "--max-tokens",
            "12",
            "--temperature",
            "1.0",
            "--top-k",
            "50",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
            "--ignore-eos",
        ]);
        assert!(ok, "{stderr}");
        let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
        json["token_ids"].clone()
    };
    assert_eq!(run("11"), run("11"));
    assert_ne!(run("11"), run("12"));
}

/// `--device cuda` on a machine without CUDA is a clear error, `--device auto` falls back to the
/// CPU there (on a GPU machine both run on the GPU; the GPU tests cover that).
#[test]
fn device_selection_without_a_gpu() {
    if dsv3_cuda::device_status().is_ok() {
        eprintln!("skipped: a CUDA GPU is present");
        return;
    }
    let base = ["--prompt-token-ids", "0,5,77", "--max-tokens", "4", "--json"];
    let (ok, _, err) = generate(&[&base[..], &["--device", "cuda"]].concat());
    assert!(!ok, "--device cuda must fail without a GPU");
    assert!(
        err.contains("--device cuda") && err.contains("CUDA"),
        "unclear error: {err}"
    );
    let (ok_auto, auto, _) = generate(&[&base[..], &["--device", "auto"]].concat());
    let (ok_cpu, cpu, _) = generate(&[&base[..], &["--device", "cpu"]].concat());
    assert!(ok_auto && ok_cpu);
    assert_eq!(auto, cpu, "--device auto must run on the CPU here");
}

#[test]
fn bench_serve_drives_streams_through_the_api() {
    let dir = tempfile::tempdir().expect("temp dir");
    let table = dir.path().join("serving.md");
    let out = Command::new(env!("CARGO_BIN_EXE_dsv3-worker"))
        .args([
            "bench-serve",
            "--device",
            "cpu",
            "--batches",
            "1,3",
            "--prompt-len",
            "8",
        ])
        .args([
            "--max-tokens",
            "12",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--output",
        ])
        .arg(&table)
        .output()
        .expect("run dsv3-worker");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&table).expect("table written");
    // Every stream got its 12 tokens (the bench fails otherwise); one row per batch with positive rates.
    let rows: Vec<Vec<f64>> = text
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| streams"))
        .map(|l| {
            l.split('|')
                .filter_map(|c| c.trim().trim_end_matches('%').parse().ok())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    for (row, streams) in rows.iter().zip([1.0, 3.0]) {
        assert_eq!(row[0], streams, "{text}");
        assert!(row[1..].iter().take(8).all(|v| *v > 0.0), "{text}");
    }
}

/// `--data-plane nccl` where it cannot work is refused by name before anything loads: ranks on
/// the CPU, f32 activations (the data plane carries bf16), masking unavailable experts (a shard
/// that leaves ends its sequences), and, without a GPU, an attention rank on `--device auto`.
#[test]
fn the_nccl_data_plane_is_refused_by_name_where_it_cannot_work() {
    let run = |args: &[&str]| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_dsv3-worker"))
            .args(args)
            .output()
            .expect("run dsv3-worker");
        assert!(!out.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let attention = [
        "attention",
        "--port",
        "1",
        "--expert-peers",
        "127.0.0.1:9",
        "--data-plane",
        "nccl",
    ];
    let expert = ["expert", "--port", "1", "--data-plane", "nccl"];
    for (args, named) in [
        (&[&attention[..], &["--device", "cpu"]].concat(), "--device cpu"),
        (&[&expert[..], &["--device", "cpu"]].concat(), "--device cpu"),
        (
            &[&attention[..], &["--activation-dtype", "f32"]].concat(),
            "--activation-dtype f32",
        ),
        (
            &[&attention[..], &["--unavailable-experts", "mask"]].concat(),
            "--unavailable-experts mask",
        ),
    ] {
        let err = run(args);
        assert!(
            err.contains("--data-plane") && err.contains(named),
            "{args:?}: unclear error: {err}"
        );
    }
    if dsv3_cuda::device_status().is_err() {
        let err = run(&attention);
        assert!(
            err.contains("--data-plane nccl") && err.contains("GPU"),
            "unclear error: {err}"
        );
    }
}
