//! Replays the committed fuzz corpora (`fuzz/corpus/TARGET/*`) through the
//! fuzz targets' bodies (`gateway_actors::fuzzing`) in `make test`: every
//! input a fuzzing run kept, and every crash it found (kept there after the
//! fix), must pass. `make fuzz` runs the targets themselves with libFuzzer.

use std::path::PathBuf;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| f(&data));
        assert!(result.is_ok(), "{} fails on {}", target, path.display());
        n += 1;
    }
    assert!(n > 0, "no corpus for {target}");
}

#[test]
fn the_fuzz_corpora_replay_cleanly() {
    replay("telemetry", gateway_actors::fuzzing::telemetry);
    replay("topics", gateway_actors::fuzzing::topics);
    replay("routes", gateway_actors::fuzzing::routes);
    replay("control", gateway_actors::fuzzing::control);
}
