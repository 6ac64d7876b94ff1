//! Directories that survive a power cut.
//!
//! On Linux a new directory entry (a created file or directory, a rename) is
//! durable only once its parent directory has been fsync'd; fsyncing the
//! file itself is not enough. `create_dir_all` alone leaves every directory
//! it made to the mercy of the next power cut, and with it everything
//! stored below (found by the power-cut scenario of `make chaos`, whose
//! filesystem drops unsynced entries).

use std::io;
use std::path::{Path, PathBuf};

/// Fsyncs the directory `dir` (its entries become durable).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)?.sync_all()
}

/// The parent of `path` as a directory to fsync (`.` for a bare name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates `dir` and its missing parents and makes them durable: every
/// directory on the way, from `dir` up to the parent of the first one that
/// had to be created, is fsync'd. An existing `dir` gets its own entry
/// synced too (cheap, and it covers a directory created by a run that was
/// cut before it synced).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut p = dir.to_path_buf();
    while !p.exists() {
        missing.push(p.clone());
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent.to_path_buf(),
            _ => break,
        }
    }
    std::fs::create_dir_all(dir)?;
    for d in &missing {
        sync_dir(d)?;
    }
    sync_dir(&parent_dir(missing.last().map_or(dir, PathBuf::as_path)))
}

/// Fsyncs the directory that holds `file`, so that a file just created
/// (and fsync'd) there cannot disappear in a power cut.
pub fn sync_parent(file: &Path) -> io::Result<()> {
    sync_dir(&parent_dir(file))
}

#[cfg(test)]
mod tests {
    #[test]
    fn creates_nested_directories_and_accepts_existing_and_relative_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        super::create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        super::create_dir_all(&deep).unwrap();
        let file = deep.join("f");
        std::fs::write(&file, "x").unwrap();
        super::sync_parent(&file).unwrap();
        // A bare relative name syncs the current directory.
        super::sync_parent(std::path::Path::new("Cargo.toml")).unwrap();
        assert!(super::create_dir_all(&file.join("below-a-file")).is_err());
    }
}
