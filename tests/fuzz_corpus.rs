//! Replays every file of the fuzz seed corpus (`fuzz/corpus/<target>/`) through the same
//! property checks the cargo-fuzz targets run, on stable Rust, so that the properties guard CI
//! without nightly.

#[path = "../fuzz/props.rs"]
mod props;

use std::fs;
use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| check(&data));
        assert!(
            result.is_ok(),
            "{target}: {} fails its properties",
            path.display()
        );
        files += 1;
    }
    assert!(files > 0, "{target}: empty corpus");
}

#[test]
fn forward_train_corpus() {
    replay("forward_train", props::check_forward_train);
}

#[test]
fn forward_eval_corpus() {
    replay("forward_eval", props::check_forward_eval);
}

#[test]
fn moments_merge_corpus() {
    replay("moments_merge", props::check_moments_merge);
}

#[test]
fn backward_corpus() {
    replay("backward", props::check_backward);
}
