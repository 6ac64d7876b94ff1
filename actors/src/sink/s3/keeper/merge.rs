//! The archive keeper's merge of many objects into one, safe against a
//! crash or a power cut at any step: the merged object is written under a
//! temporary name and synced; a manifest naming it and its parts is synced;
//! the object is renamed into place and the directory synced; only then
//! are the parts deleted, and the manifest last. [`recover`] finishes or
//! undoes a merge it finds interrupted, so a record is never in two objects
//! of one hour nor in none. Which objects to merge, and when, is the pass's
//! decision (`keeper.rs`).

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

use super::{parse_name, remove_if_there, Object, MERGED, SUFFIX};
use crate::durable::sync_dir;

/// A merge in progress in an hour directory.
pub(super) const MANIFEST: &str = ".compacting";

/// The manifest's last line: without it the manifest is torn.
pub(super) const MANIFEST_END: &str = "end";

pub(super) fn temp_name(out: &str) -> String {
    format!(".{out}.tmp")
}

/// The output a temporary file is for: the inverse of [`temp_name`].
pub(super) fn output_of_temp(name: &str) -> Option<&str> {
    name.strip_prefix('.')?.strip_suffix(".tmp")
}

/// Deletes a merge's parts (all but the merged object itself), then its manifest.
pub(super) fn finish_merge(dir: &Path, out: &str, parts: &[&str]) -> io::Result<()> {
    for part in parts {
        // A manifest only ever names objects of its own directory.
        if *part != out && parse_name(part).is_some() && !part.contains('/') {
            remove_if_there(&dir.join(part))?;
        }
    }
    sync_dir(dir)?;
    remove_if_there(&dir.join(MANIFEST))?;
    sync_dir(dir)
}

/// Finishes or undoes a merge that a crash interrupted in `dir` (its
/// manifest is there). A temporary file without a manifest is deleted by
/// [`objects_in`], which lists the directory next.
pub(super) fn recover(dir: &Path) -> io::Result<()> {
    match fs::read_to_string(dir.join(MANIFEST)) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let complete = lines.len() >= 3 && lines.last() == Some(&MANIFEST_END);
            let out = lines.first().copied().filter(|o| parse_name(o).is_some());
            match out {
                Some(out) if complete && !dir.join(temp_name(out)).exists() => {
                    // Renamed into place: only the parts' deletion was missing.
                    finish_merge(dir, out, &lines[1..lines.len() - 1])?;
                }
                _ => {
                    // Not renamed: the parts are whole; forget the merge.
                    if let Some(out) = out {
                        remove_if_there(&dir.join(temp_name(out)))?;
                    }
                    remove_if_there(&dir.join(MANIFEST))?;
                    sync_dir(dir)?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// A decompression error (a corrupt or truncated gzip stream), as opposed
/// to a failing disk.
pub(super) fn corrupt(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof
    )
}

/// What [`merge`] did.
pub(super) enum Merge {
    /// The merged object's name.
    Done(String),
    /// `parts[i]` does not decompress; nothing was changed.
    Unreadable(usize),
}

/// Merges `parts` (objects of one gateway id in `dir`, in seq order) into
/// one object; returns its name. An earlier merged object is copied as it
/// is; the batches' small objects are decompressed into one new gzip member
/// at `level` (one member compresses far better than hundreds of one-record
/// ones, and decompressing checks each of them).
pub(super) fn merge(dir: &Path, mut parts: Vec<Object>, level: u32) -> io::Result<Merge> {
    let first = parts.iter().map(|o| o.first).min().unwrap_or(0);
    let last = parts.iter().map(|o| o.last).max().unwrap_or(0);
    let out = format!("{}-{first}-{last}{MERGED}{SUFFIX}", parts[0].gateway_id);
    // A merged object of that name already (the same seq range, merged
    // before): its records go into the new one, which replaces it.
    if !parts.iter().any(|o| o.name == out) {
        if let Ok(meta) = fs::metadata(dir.join(&out)) {
            parts.push(Object {
                name: out.clone(),
                merged: true,
                mtime_ms: 0,
                gateway_id: parts[0].gateway_id.clone(),
                first,
                last,
                size: meta.len(),
            });
        }
    }
    let tmp = dir.join(temp_name(&out));
    let mut w = BufWriter::with_capacity(256 << 10, File::create(&tmp)?);
    for part in parts.iter().filter(|o| o.merged) {
        io::copy(&mut File::open(dir.join(&part.name))?, &mut w)?;
    }
    let mut member = GzEncoder::new(w, Compression::new(level));
    let mut buf = vec![0u8; 64 << 10];
    for (i, part) in parts.iter().enumerate().filter(|(_, o)| !o.merged) {
        let mut dec = MultiGzDecoder::new(BufReader::new(File::open(dir.join(&part.name))?));
        loop {
            let n = match dec.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if corrupt(&e) => {
                    drop(member);
                    remove_if_there(&tmp)?;
                    return Ok(Merge::Unreadable(i));
                }
                Err(e) => return Err(e),
            };
            member.write_all(&buf[..n])?;
        }
    }
    member
        .finish()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    sync_dir(dir)?;
    let mut manifest = format!("{out}\n");
    for part in &parts {
        manifest.push_str(&part.name);
        manifest.push('\n');
    }
    manifest.push_str(MANIFEST_END);
    manifest.push('\n');
    let mut f = File::create(dir.join(MANIFEST))?;
    f.write_all(manifest.as_bytes())?;
    f.sync_all()?;
    sync_dir(dir)?;
    fs::rename(&tmp, dir.join(&out))?;
    sync_dir(dir)?;
    let names: Vec<&str> = parts.iter().map(|o| o.name.as_str()).collect();
    finish_merge(dir, &out, &names)?;
    Ok(Merge::Done(out))
}
