//! The config-loading fuzz target's body (`fuzz/fuzz_targets/config.rs`,
//! `make fuzz`), here so that a unit test replays its committed corpus
//! (`fuzz/corpus/config`) in `make test` without libFuzzer. The other
//! targets' bodies are in `gateway_actors::fuzzing`.

use crate::config::Loaded;

/// A configuration file's text through every layer's checks (defaults, the
/// file, validation of each section and sink kind). It must never panic;
/// an accepted configuration renders (`config print`) to a text that loads
/// again to the same configuration.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Loaded::check_text("fuzz", text) {
        Ok(s) => {
            let again = Loaded::check_text("rendered", &s.rendered).unwrap_or_else(|e| {
                panic!("config print's output does not load: {e}\n{}", s.rendered)
            });
            assert_eq!(again.rendered, s.rendered, "config print is not stable");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Every committed input of the config target passes (a crash found by
    /// `make fuzz` is kept there after its fix).
    #[test]
    fn the_config_fuzz_corpus_replays_cleanly() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(|| super::config(&data));
            assert!(result.is_ok(), "config fails on {}", path.display());
            n += 1;
        }
        assert!(n >= 3, "the config corpus has {n} inputs");
    }
}
