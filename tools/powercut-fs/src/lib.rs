//! # powercut-fs: a filesystem that forgets what was not synced
//!
//! Test support for the fault harness (`scripts/chaos.py`, scenario
//! `powercut`): an in-memory FUSE filesystem on which a *power cut* can be
//! simulated. It keeps two states:
//!
//! - the **volatile** state: what processes see. Every operation (create,
//!   write, truncate, mkdir, rename, unlink, rmdir, chmod, ...) changes only
//!   this state.
//! - the **durable** state: what a disk would hold after a power loss. Only
//!   the two sync operations move anything into it:
//!   - `fsync`/`fdatasync` of a file makes that file's current data, size
//!     and mode durable (under its inode, not under any name);
//!   - `fsync` of a directory (`open(dir)` + `fsync`, FUSE `fsyncdir`) makes
//!     that directory's current list of entries durable: the names created,
//!     renamed into it, renamed out of it and unlinked since its last sync.
//!     A child that appears in the durable state this way for the first time
//!     and was never synced itself is durable *empty* (a file of size 0, a
//!     directory without entries): its name survived, its contents did not.
//!
//! A **cut** ([`Controller::cut`], `SIGUSR1` to the `powercut-fs` binary)
//! replaces the volatile state by the durable one: every inode reachable from
//! the root through durable directory entries comes back with its durable
//! contents, everything else is gone. That is the strict POSIX view:
//!
//! - data written but not fsynced is lost (the file reverts to its last
//!   fsynced contents, or is empty);
//! - a file created and fsynced whose directory was never fsynced afterwards
//!   is lost, data and all (SQLite fsyncs the directory after creating its
//!   `-wal`/`-journal` file for this reason);
//! - a rename or unlink not followed by an fsync of the directory is undone
//!   (a cross-directory rename is durable on each side when that side's
//!   directory is synced);
//! - a directory whose own entry in its parent was never synced is lost
//!   with everything below it.
//!
//! Every file handle open at the moment of a cut is stale afterwards:
//! operations on it fail with `EIO` (the writer is meant to have been killed
//! with SIGKILL just before; a real machine would have lost it too). Inode
//! numbers are never reused, so the kernel's caches cannot confuse a file
//! of before a cut with a new one; entries and attributes are not cached by
//! the kernel (TTL 0), and the kernel's page cache of each file is dropped
//! at the cut and whenever a file is opened (no `keep_cache`, no
//! `direct_io`: shared writable `mmap`, which SQLite's WAL mode needs for its
//! `-shm` file, works).
//!
//! Not implemented: hard links, symlinks, special files, extended
//! attributes. File locks (`fcntl` and `flock`) are left to the kernel,
//! which handles them locally when a filesystem does not implement them.
//! File data lives in 4 KiB copy-on-write chunks shared between the two
//! states, so an fsync costs a copy of the chunk list, not of the data.
//! Requests are served one at a time by one thread; durable inodes that no
//! durable directory names any more are forgotten at the next cut.
//!
//! ## Use
//!
//! - The binary: `powercut-fs MOUNTPOINT --status FILE` (root, `/dev/fuse`;
//!   mounted with mount(2), no libfuse or fusermount needed); `SIGUSR1` cuts
//!   and the status file's `cuts` counter says when the cut is done;
//!   `SIGTERM` unmounts. See `src/main.rs`.
//! - In-process: [`mount`] returns a [`Mounted`] whose [`Mounted::cut`]
//!   cuts. Do not let a process that will outlive the cut hold SQLite
//!   databases on it: the cut is meant to follow the SIGKILL of every
//!   writer, as a power loss would.
//!
//! A cut is race-free after the writer has been reaped: a request the
//! kernel has handed to this filesystem is answered before the killed
//! process can exit, and one not handed over yet is dropped with it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackgroundSession, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption, Notifier, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Size of the copy-on-write chunks file data is kept in.
pub const CHUNK: usize = 4096;
/// The kernel caches neither entries nor attributes: after a cut it must ask again.
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;
/// What `statfs` reports as the size of the filesystem.
const CAPACITY: u64 = 64 << 30;
const NAME_MAX: usize = 255;

type Chunk = Arc<[u8; CHUNK]>;

/// File contents: a size and sparse chunks (`None` reads as zeros). Bytes of
/// a chunk past `size` are always zero.
#[derive(Clone, Debug, Default)]
struct Data {
    size: u64,
    chunks: Vec<Option<Chunk>>,
}

impl Data {
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        if offset >= self.size {
            return Vec::new();
        }
        let end = self.size.min(offset.saturating_add(len as u64));
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        while pos < end {
            let idx = (pos / CHUNK as u64) as usize;
            let within = (pos % CHUNK as u64) as usize;
            let n = (CHUNK - within).min((end - pos) as usize);
            if let Some(Some(chunk)) = self.chunks.get(idx) {
                let at = (pos - offset) as usize;
                out[at..at + n].copy_from_slice(&chunk[within..within + n]);
            }
            pos += n as u64;
        }
        out
    }

    fn write(&mut self, offset: u64, buf: &[u8]) {
        let end = offset + buf.len() as u64;
        let last = end.div_ceil(CHUNK as u64) as usize;
        if self.chunks.len() < last {
            self.chunks.resize(last, None);
        }
        let mut pos = offset;
        while pos < end {
            let idx = (pos / CHUNK as u64) as usize;
            let within = (pos % CHUNK as u64) as usize;
            let n = (CHUNK - within).min((end - pos) as usize);
            let chunk = self.chunks[idx].get_or_insert_with(|| Arc::new([0u8; CHUNK]));
            let at = (pos - offset) as usize;
            Arc::make_mut(chunk)[within..within + n].copy_from_slice(&buf[at..at + n]);
            pos += n as u64;
        }
        self.size = self.size.max(end);
    }

    fn truncate(&mut self, size: u64) {
        if size < self.size {
            self.chunks.truncate(size.div_ceil(CHUNK as u64) as usize);
            let within = (size % CHUNK as u64) as usize;
            if within != 0 {
                if let Some(Some(chunk)) = self.chunks.last_mut() {
                    Arc::make_mut(chunk)[within..].fill(0);
                }
            }
        }
        self.size = size;
    }
}

#[derive(Clone, Debug)]
enum Body {
    File(Data),
    Dir(BTreeMap<OsString, u64>),
}

impl Body {
    fn kind(&self) -> FileType {
        match self {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
        }
    }

    /// The same kind of thing, with no contents.
    fn empty_like(&self) -> Body {
        match self {
            Body::File(_) => Body::File(Data::default()),
            Body::Dir(_) => Body::Dir(BTreeMap::new()),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Meta {
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    crtime: SystemTime,
}

impl Meta {
    fn new(perm: u32, uid: u32, gid: u32) -> Self {
        let now = SystemTime::now();
        Meta {
            perm: (perm & 0o7777) as u16,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
        }
    }
}

/// An inode of the volatile state.
#[derive(Debug)]
struct Node {
    body: Body,
    meta: Meta,
    /// Directory entries naming it (files); kept while open even at 0.
    nlink: u32,
    /// The directory it is in (directories only: `..`).
    parent: u64,
    /// Open file handles (files only).
    open: u32,
}

/// An inode of the durable state.
#[derive(Clone, Debug)]
struct Durable {
    body: Body,
    meta: Meta,
}

/// What a `setattr` changes (`None`: unchanged).
struct AttrChange {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
}

#[derive(Debug)]
struct Handle {
    ino: u64,
    /// readdir's view of a directory, taken at offset 0.
    listing: Option<Vec<(u64, FileType, OsString)>>,
}

/// At most this many paths are named in a [`CutReport`].
pub const NAMED: usize = 8;

/// What one cut did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Inodes (files and directories) that existed before the cut and are gone.
    pub dropped: usize,
    /// Inodes that survived.
    pub kept: usize,
    /// Surviving files whose contents changed (unsynced data thrown away).
    pub reverted: usize,
    /// File handles that were open and are now stale.
    pub stale_handles: usize,
    /// Paths (relative to the mount) of up to [`NAMED`] dropped inodes;
    /// `(unlinked)` for a file that had no name left.
    pub dropped_paths: Vec<String>,
    /// Paths of up to [`NAMED`] reverted files.
    pub reverted_paths: Vec<String>,
}

/// Counters since the mount.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Cuts so far.
    pub cuts: u64,
    /// `fsync`/`fdatasync` calls on files.
    pub fsyncs: u64,
    /// `fsync` calls on directories.
    pub fsyncdirs: u64,
    /// Files in the volatile state now.
    pub files: u64,
    /// Directories in the volatile state now (the root included).
    pub dirs: u64,
    /// Bytes of file data in the volatile state now (sum of the sizes).
    pub bytes: u64,
    /// The last cut.
    pub last_cut: CutReport,
}

#[derive(Debug)]
struct State {
    nodes: HashMap<u64, Node>,
    durable: HashMap<u64, Durable>,
    handles: HashMap<u64, Handle>,
    next_ino: u64,
    next_fh: u64,
    stats: Stats,
}

fn same_data(a: &Data, b: &Data) -> bool {
    a.size == b.size
        && a.chunks.len() == b.chunks.len()
        && a.chunks.iter().zip(&b.chunks).all(|(x, y)| match (x, y) {
            (None, None) => true,
            (Some(x), Some(y)) => Arc::ptr_eq(x, y) || x[..] == y[..],
            _ => false,
        })
}

impl State {
    fn new(uid: u32, gid: u32) -> Self {
        let meta = Meta::new(0o755, uid, gid);
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                body: Body::Dir(BTreeMap::new()),
                meta,
                nlink: 2,
                parent: ROOT,
                open: 0,
            },
        );
        let mut durable = HashMap::new();
        durable.insert(
            ROOT,
            Durable {
                body: Body::Dir(BTreeMap::new()),
                meta,
            },
        );
        State {
            nodes,
            durable,
            handles: HashMap::new(),
            next_ino: ROOT + 1,
            next_fh: 1,
            stats: Stats::default(),
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.node(dir)?.body {
            Body::Dir(entries) => Ok(entries),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.node_mut(dir)?.body {
            Body::Dir(entries) => Ok(entries),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let n = self.node(ino)?;
        let (size, nlink) = match &n.body {
            Body::File(d) => (d.size, n.nlink),
            Body::Dir(_) => (4096, 2),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: n.meta.atime,
            mtime: n.meta.mtime,
            ctime: n.meta.ctime,
            crtime: n.meta.crtime,
            kind: n.body.kind(),
            perm: n.meta.perm,
            nlink,
            uid: n.meta.uid,
            gid: n.meta.gid,
            rdev: 0,
            blksize: CHUNK as u32,
            flags: 0,
        })
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(parent)?
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    fn touch_dir(&mut self, dir: u64) {
        if let Some(n) = self.nodes.get_mut(&dir) {
            let now = SystemTime::now();
            n.meta.mtime = now;
            n.meta.ctime = now;
        }
    }

    /// A new file or directory named `name` in `parent` (volatile only).
    fn create(&mut self, parent: u64, name: &OsStr, body: Body, meta: Meta) -> Result<u64, Errno> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let is_dir = matches!(body, Body::Dir(_));
        self.nodes.insert(
            ino,
            Node {
                body,
                meta,
                nlink: if is_dir { 2 } else { 1 },
                parent,
                open: 0,
            },
        );
        self.entries_mut(parent)?.insert(name.to_os_string(), ino);
        self.touch_dir(parent);
        Ok(ino)
    }

    /// Drops a volatile inode nothing names and nothing has open.
    fn collect(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get(&ino) {
            let orphan = match n.body {
                Body::File(_) => n.nlink == 0 && n.open == 0,
                Body::Dir(_) => n.nlink == 0,
            };
            if orphan {
                self.nodes.remove(&ino);
            }
        }
    }

    /// Removes the entry `name` from `parent`; `dir` says whether it must be a directory.
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.child(parent, name)?;
        match (&self.node(ino)?.body, dir) {
            (Body::File(_), true) => return Err(Errno::ENOTDIR),
            (Body::Dir(_), false) => return Err(Errno::EISDIR),
            (Body::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        self.entries_mut(parent)?.remove(name);
        self.touch_dir(parent);
        let n = self.node_mut(ino)?;
        n.nlink = if dir { 0 } else { n.nlink.saturating_sub(1) };
        n.meta.ctime = SystemTime::now();
        self.collect(ino);
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        if newname.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let ino = self.child(parent, name)?;
        self.entries(newparent)?;
        let moving_dir = matches!(self.node(ino)?.body, Body::Dir(_));
        if let Some(&target) = self.entries(newparent)?.get(newname) {
            if target == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (&self.node(target)?.body, moving_dir) {
                (Body::Dir(_), false) => return Err(Errno::EISDIR),
                (Body::File(_), true) => return Err(Errno::ENOTDIR),
                (Body::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
            self.entries_mut(newparent)?.remove(newname);
            let t = self.node_mut(target)?;
            t.nlink = if moving_dir {
                0
            } else {
                t.nlink.saturating_sub(1)
            };
            self.collect(target);
        }
        self.entries_mut(parent)?.remove(name);
        self.entries_mut(newparent)?
            .insert(newname.to_os_string(), ino);
        let n = self.node_mut(ino)?;
        n.meta.ctime = SystemTime::now();
        if moving_dir {
            n.parent = newparent;
        }
        self.touch_dir(parent);
        self.touch_dir(newparent);
        Ok(())
    }

    fn open(&mut self, ino: u64) -> Result<u64, Errno> {
        let n = self.node_mut(ino)?;
        if let Body::File(_) = n.body {
            n.open += 1;
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, listing: None });
        Ok(fh)
    }

    /// The handle `fh` of `ino`; `EIO` for a handle of before a cut.
    fn handle(&mut self, ino: u64, fh: u64) -> Result<&mut Handle, Errno> {
        match self.handles.get_mut(&fh) {
            Some(h) if h.ino == ino => Ok(h),
            _ => Err(Errno::EIO),
        }
    }

    fn release(&mut self, fh: u64) {
        if let Some(h) = self.handles.remove(&fh) {
            if let Some(n) = self.nodes.get_mut(&h.ino) {
                if let Body::File(_) = n.body {
                    n.open = n.open.saturating_sub(1);
                }
                self.collect(h.ino);
            }
        }
    }

    fn data_mut(&mut self, ino: u64) -> Result<&mut Data, Errno> {
        match &mut self.node_mut(ino)?.body {
            Body::File(d) => Ok(d),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn read(&mut self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        self.handle(ino, fh)?;
        match &self.node(ino)?.body {
            Body::File(d) => Ok(d.read(offset, size as usize)),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn write(&mut self, ino: u64, fh: u64, offset: u64, buf: &[u8]) -> Result<u32, Errno> {
        self.handle(ino, fh)?;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(Errno::EFBIG);
        }
        self.data_mut(ino)?.write(offset, buf);
        let n = self.node_mut(ino)?;
        let now = SystemTime::now();
        n.meta.mtime = now;
        n.meta.ctime = now;
        Ok(buf.len() as u32)
    }

    /// Makes the file's data, size and mode durable (under its inode).
    fn fsync(&mut self, ino: u64, fh: u64) -> Result<(), Errno> {
        self.handle(ino, fh)?;
        let n = self.node(ino)?;
        let body = match &n.body {
            Body::File(d) => Body::File(d.clone()),
            // fsync of a directory comes as fsyncdir; be generous anyway.
            Body::Dir(_) => return self.fsyncdir(ino, fh),
        };
        let meta = n.meta;
        self.durable.insert(ino, Durable { body, meta });
        self.stats.fsyncs += 1;
        Ok(())
    }

    /// Makes the directory's entries durable; a child named durably for the
    /// first time comes into the durable state empty.
    fn fsyncdir(&mut self, ino: u64, fh: u64) -> Result<(), Errno> {
        self.handle(ino, fh)?;
        let n = self.node(ino)?;
        let entries = match &n.body {
            Body::Dir(entries) => entries.clone(),
            Body::File(_) => return Err(Errno::ENOTDIR),
        };
        let meta = n.meta;
        for child in entries.values() {
            if !self.durable.contains_key(child) {
                let c = self.node(*child)?;
                let d = Durable {
                    body: c.body.empty_like(),
                    meta: c.meta,
                };
                self.durable.insert(*child, d);
            }
        }
        self.durable.insert(
            ino,
            Durable {
                body: Body::Dir(entries),
                meta,
            },
        );
        self.stats.fsyncdirs += 1;
        Ok(())
    }

    fn setattr(&mut self, ino: u64, change: AttrChange) -> Result<FileAttr, Errno> {
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = change;
        if let Some(size) = size {
            if size > i64::MAX as u64 {
                return Err(Errno::EFBIG);
            }
            self.data_mut(ino)?.truncate(size);
        }
        let now = SystemTime::now();
        let n = self.node_mut(ino)?;
        let at = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => now,
        };
        if let Some(mode) = mode {
            n.meta.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            n.meta.uid = uid;
        }
        if let Some(gid) = gid {
            n.meta.gid = gid;
        }
        if let Some(t) = atime {
            n.meta.atime = at(t);
        }
        if let Some(t) = mtime {
            n.meta.mtime = at(t);
        } else if size.is_some() {
            n.meta.mtime = now;
        }
        n.meta.ctime = now;
        self.attr(ino)
    }

    fn listing(&self, ino: u64) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
        let n = self.node(ino)?;
        let Body::Dir(entries) = &n.body else {
            return Err(Errno::ENOTDIR);
        };
        let mut out = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (n.parent, FileType::Directory, OsString::from("..")),
        ];
        for (name, child) in entries {
            if let Ok(c) = self.node(*child) {
                out.push((*child, c.body.kind(), name.clone()));
            }
        }
        Ok(out)
    }

    /// The path of every named inode of the volatile state (the first name
    /// of a file that has several).
    fn paths(&self) -> HashMap<u64, String> {
        let mut out = HashMap::from([(ROOT, String::new())]);
        let mut stack = vec![ROOT];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = self.entries(dir) else {
                continue;
            };
            let prefix = out[&dir].clone();
            for (name, &child) in entries {
                if out.contains_key(&child) {
                    continue;
                }
                let path = if prefix.is_empty() {
                    name.to_string_lossy().into_owned()
                } else {
                    format!("{prefix}/{}", name.to_string_lossy())
                };
                out.insert(child, path);
                if matches!(self.nodes.get(&child).map(|n| &n.body), Some(Body::Dir(_))) {
                    stack.push(child);
                }
            }
        }
        out
    }

    fn count(&mut self) {
        let (mut files, mut dirs, mut bytes) = (0, 0, 0);
        for n in self.nodes.values() {
            match &n.body {
                Body::File(d) => {
                    files += 1;
                    bytes += d.size;
                }
                Body::Dir(_) => dirs += 1,
            }
        }
        self.stats.files = files;
        self.stats.dirs = dirs;
        self.stats.bytes = bytes;
    }

    /// The power cut: the volatile state becomes the durable one. Returns the
    /// report and the inode numbers the kernel may still cache.
    fn cut(&mut self) -> (CutReport, Vec<u64>) {
        let before: Vec<u64> = self.nodes.keys().copied().collect();
        let before_all = before.clone();
        let paths = self.paths();
        let path_of = |ino: u64| {
            paths
                .get(&ino)
                .cloned()
                .unwrap_or_else(|| "(unlinked)".into())
        };
        // Walk the durable tree from the root. A directory reachable twice
        // (a cross-directory rename synced on both sides at different times)
        // keeps its first name; a file reachable twice has two links.
        let mut links: HashMap<u64, u32> = HashMap::new();
        let mut parents: HashMap<u64, u64> = HashMap::from([(ROOT, ROOT)]);
        let mut dir_entries: HashMap<u64, BTreeMap<OsString, u64>> = HashMap::new();
        let mut stack = vec![ROOT];
        let mut seen_dirs: HashSet<u64> = HashSet::from([ROOT]);
        while let Some(dir) = stack.pop() {
            let Some(Durable {
                body: Body::Dir(entries),
                ..
            }) = self.durable.get(&dir)
            else {
                continue;
            };
            let mut kept = BTreeMap::new();
            for (name, &child) in entries {
                match self.durable.get(&child).map(|d| &d.body) {
                    // A directory seen before keeps its first name.
                    Some(Body::Dir(_)) if seen_dirs.insert(child) => {
                        parents.insert(child, dir);
                        stack.push(child);
                        kept.insert(name.clone(), child);
                    }
                    Some(Body::File(_)) => {
                        *links.entry(child).or_default() += 1;
                        kept.insert(name.clone(), child);
                    }
                    _ => {}
                }
            }
            dir_entries.insert(dir, kept);
        }
        let reachable: HashSet<u64> = seen_dirs.iter().chain(links.keys()).copied().collect();
        self.durable.retain(|ino, _| reachable.contains(ino));
        let mut report = CutReport {
            stale_handles: self.handles.len(),
            ..CutReport::default()
        };
        let mut nodes = HashMap::new();
        for (&ino, d) in self.durable.iter_mut() {
            if let Some(entries) = dir_entries.remove(&ino) {
                d.body = Body::Dir(entries);
            }
            if let (
                Some(Node {
                    body: Body::File(old),
                    ..
                }),
                Body::File(new),
            ) = (self.nodes.get(&ino), &d.body)
            {
                if !same_data(old, new) {
                    report.reverted += 1;
                    if report.reverted_paths.len() < NAMED {
                        report.reverted_paths.push(path_of(ino));
                    }
                }
            }
            let is_dir = matches!(d.body, Body::Dir(_));
            nodes.insert(
                ino,
                Node {
                    body: d.body.clone(),
                    meta: d.meta,
                    nlink: if is_dir {
                        2
                    } else {
                        links.get(&ino).copied().unwrap_or(1)
                    },
                    parent: parents.get(&ino).copied().unwrap_or(ROOT),
                    open: 0,
                },
            );
        }
        report.kept = nodes.len();
        let dropped: Vec<u64> = before
            .into_iter()
            .filter(|i| !nodes.contains_key(i))
            .collect();
        report.dropped = dropped.len();
        let mut named: Vec<String> = dropped.iter().map(|&i| path_of(i)).collect();
        named.sort();
        named.truncate(NAMED);
        report.dropped_paths = named;
        report.reverted_paths.sort();
        self.nodes = nodes;
        self.handles.clear();
        self.stats.cuts += 1;
        self.stats.last_cut = report.clone();
        (report, before_all)
    }
}

/// The filesystem (give it to [`mount`] or to `fuser` directly).
#[derive(Debug)]
pub struct PowercutFs {
    state: Arc<Mutex<State>>,
}

/// Cuts the power of a [`PowercutFs`] and reads its counters; cheap to clone.
#[derive(Clone, Debug)]
pub struct Controller {
    state: Arc<Mutex<State>>,
    notifier: Arc<OnceLock<Notifier>>,
}

/// A new, empty filesystem whose root belongs to the current user, and its controller.
pub fn new_fs() -> (PowercutFs, Controller) {
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let state = Arc::new(Mutex::new(State::new(uid, gid)));
    (
        PowercutFs {
            state: state.clone(),
        },
        Controller {
            state,
            notifier: Arc::new(OnceLock::new()),
        },
    )
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic in one request must not wedge the filesystem.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Controller {
    /// Simulates a power cut: everything not durable is forgotten, open
    /// handles go stale, and the kernel's caches of the old files are dropped.
    pub fn cut(&self) -> CutReport {
        let (report, inodes) = lock(&self.state).cut();
        // Outside the lock: dropping a cached page may make the kernel write
        // it back first (a stale handle then, which gets EIO).
        if let Some(notifier) = self.notifier.get() {
            for ino in inodes {
                let _ = notifier.inval_inode(INodeNo(ino), 0, -1);
            }
        }
        report
    }

    /// Counters since the mount.
    pub fn stats(&self) -> Stats {
        let mut state = lock(&self.state);
        state.count();
        state.stats.clone()
    }
}

/// A mounted [`PowercutFs`]; dropping it unmounts.
#[derive(Debug)]
pub struct Mounted {
    session: Option<BackgroundSession>,
    controller: Controller,
    mountpoint: PathBuf,
}

/// Mounts a new, empty [`PowercutFs`] at `mountpoint` (an existing
/// directory), served by a background thread. Needs `/dev/fuse` and root
/// (mount(2)), or a `fusermount3` for other users.
pub fn mount(mountpoint: &Path) -> io::Result<Mounted> {
    let (fs, controller) = new_fs();
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("powercut".into()),
        MountOption::Subtype("powercut".into()),
        MountOption::DefaultPermissions,
        MountOption::RW,
        MountOption::NoAtime,
    ];
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    let _ = controller.notifier.set(session.notifier());
    Ok(Mounted {
        session: Some(session),
        controller,
        mountpoint: mountpoint.to_path_buf(),
    })
}

impl Mounted {
    /// See [`Controller::cut`].
    pub fn cut(&self) -> CutReport {
        self.controller.cut()
    }

    /// A handle to cut and read counters from elsewhere.
    pub fn controller(&self) -> Controller {
        self.controller.clone()
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// False once the session has ended (for instance after an external `umount`).
    pub fn is_alive(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished())
    }

    /// Unmounts; if the mount is busy, detaches it lazily (`umount -l`).
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => Ok(()),
            Err(e) => {
                let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
                    .map_err(io::Error::other)?;
                // SAFETY: a valid NUL-terminated path; umount2 touches nothing else.
                let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::other(format!(
                        "unmount failed ({e}), lazy detach too ({})",
                        io::Error::last_os_error()
                    )))
                }
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.unmount_inner();
    }
}

impl PowercutFs {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn perm(mode: u32, umask: u32) -> u32 {
    mode & !umask & 0o7777
}

impl Filesystem for PowercutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = self.state();
        match state.child(parent.0, name).and_then(|ino| state.attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.state().setattr(
            ino.0,
            AttrChange {
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            },
        ) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        let mut state = self.state();
        let meta = Meta::new(perm(mode, umask), req.uid(), req.gid());
        match state
            .create(parent.0, name, Body::File(Data::default()), meta)
            .and_then(|ino| state.attr(ino))
        {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut state = self.state();
        let meta = Meta::new(perm(mode, umask), req.uid(), req.gid());
        match state
            .create(parent.0, name, Body::Dir(BTreeMap::new()), meta)
            .and_then(|ino| state.attr(ino))
        {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .state()
            .rename(parent.0, name, newparent.0, newname, flags)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.state();
        match state.node(ino.0).map(|n| n.body.kind()) {
            Ok(FileType::Directory) => reply.error(Errno::EISDIR),
            Ok(_) => match state.open(ino.0) {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(e),
            },
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            reply.error(Errno::EPERM);
            return;
        }
        let mut state = self.state();
        let meta = Meta::new(perm(mode, umask), req.uid(), req.gid());
        let created = state
            .create(parent.0, name, Body::File(Data::default()), meta)
            .and_then(|ino| Ok((state.attr(ino)?, state.open(ino)?)));
        match created {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.state().read(ino.0, fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state().write(ino.0, fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() is not a sync: nothing becomes durable here.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state().fsync(ino.0, fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.state();
        match state
            .entries(ino.0)
            .map(|_| ())
            .and_then(|_| state.open(ino.0))
        {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = self.state();
        if offset == 0 || state.handle(ino.0, fh.0).is_ok_and(|h| h.listing.is_none()) {
            match state.listing(ino.0) {
                Ok(listing) => match state.handle(ino.0, fh.0) {
                    Ok(h) => h.listing = Some(listing),
                    Err(e) => return reply.error(e),
                },
                Err(e) => return reply.error(e),
            }
        }
        let h = match state.handle(ino.0, fh.0) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let listing = h.listing.as_deref().unwrap_or_default();
        for (i, (child, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*child), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.state().release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state().fsyncdir(ino.0, fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let mut state = self.state();
        state.count();
        let block = CHUNK as u64;
        let total = CAPACITY / block;
        let used = state.stats.bytes.div_ceil(block).min(total);
        let inodes = state.nodes.len() as u64;
        reply.statfs(
            total,
            total - used,
            total - used,
            inodes + 1_000_000,
            1_000_000,
            CHUNK as u32,
            NAME_MAX as u32,
            CHUNK as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks the mode bits itself.
        match self.state().node(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let result = state.handle(ino.0, fh.0).map(|_| ()).and_then(|_| {
            let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
            match mode {
                0 => {
                    let data = state.data_mut(ino.0)?;
                    if end > data.size {
                        data.truncate(end);
                    }
                    Ok(())
                }
                libc::FALLOC_FL_KEEP_SIZE => Ok(()),
                _ => Err(Errno::from_i32(libc::EOPNOTSUPP)),
            }
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(state: &State, ino: u64) -> Vec<u8> {
        match &state.node(ino).unwrap().body {
            Body::File(d) => d.read(0, usize::MAX >> 1),
            Body::Dir(_) => panic!("a directory"),
        }
    }

    #[test]
    fn data_reads_back_what_was_written_across_chunks() {
        let mut d = Data::default();
        d.write(4090, b"0123456789");
        d.write(20_000, b"x");
        assert_eq!(d.size, 20_001);
        assert_eq!(d.read(4090, 10), b"0123456789");
        assert_eq!(d.read(5000, 4), vec![0; 4]);
        assert_eq!(d.read(20_000, 100), b"x");
        d.truncate(4093);
        assert_eq!(d.read(4090, 100), b"012");
        d.truncate(4100);
        assert_eq!(d.read(4090, 100), b"012\0\0\0\0\0\0\0");
    }

    #[test]
    fn a_durable_snapshot_does_not_see_later_writes() {
        let mut d = Data::default();
        d.write(0, &[1; 5000]);
        let snapshot = d.clone();
        d.write(10, &[2; 10]);
        assert_eq!(snapshot.read(10, 10), vec![1; 10]);
        assert_eq!(d.read(10, 10), vec![2; 10]);
        assert!(!same_data(&snapshot, &d));
    }

    #[test]
    fn the_model_keeps_only_what_was_synced() {
        let mut s = State::new(0, 0);
        let meta = Meta::new(0o644, 0, 0);
        let synced = s
            .create(
                ROOT,
                OsStr::new("synced"),
                Body::File(Data::default()),
                meta,
            )
            .unwrap();
        let unsynced = s
            .create(
                ROOT,
                OsStr::new("unsynced"),
                Body::File(Data::default()),
                meta,
            )
            .unwrap();
        let fh = s.open(synced).unwrap();
        s.write(synced, fh, 0, b"durable").unwrap();
        s.fsync(synced, fh).unwrap();
        s.write(synced, fh, 7, b" and lost").unwrap();
        let dir_fh = s.open(ROOT).unwrap();
        s.fsyncdir(ROOT, dir_fh).unwrap();
        let fh2 = s.open(unsynced).unwrap();
        s.write(unsynced, fh2, 0, b"never synced").unwrap();
        let late = s
            .create(ROOT, OsStr::new("late"), Body::File(Data::default()), meta)
            .unwrap();
        let fh3 = s.open(late).unwrap();
        s.write(late, fh3, 0, b"fsynced, its name not").unwrap();
        s.fsync(late, fh3).unwrap();

        let (report, _) = s.cut();
        assert_eq!(file(&s, synced), b"durable");
        assert_eq!(file(&s, unsynced), b"", "its name was synced, its data not");
        assert!(s.child(ROOT, OsStr::new("late")).is_err());
        assert_eq!(report.dropped, 1);
        assert_eq!(report.dropped_paths, ["late"]);
        assert_eq!(report.reverted, 2);
        assert_eq!(report.reverted_paths, ["synced", "unsynced"]);
        assert_eq!(report.stale_handles, 4);
        assert_eq!(s.write(synced, fh, 0, b"x"), Err(Errno::EIO));
    }

    #[test]
    fn an_unlinked_open_file_lives_until_released_and_comes_back_at_a_cut() {
        let mut s = State::new(0, 0);
        let meta = Meta::new(0o644, 0, 0);
        let ino = s
            .create(ROOT, OsStr::new("f"), Body::File(Data::default()), meta)
            .unwrap();
        let fh = s.open(ino).unwrap();
        s.write(ino, fh, 0, b"abc").unwrap();
        s.fsync(ino, fh).unwrap();
        let dir_fh = s.open(ROOT).unwrap();
        s.fsyncdir(ROOT, dir_fh).unwrap();
        s.remove(ROOT, OsStr::new("f"), false).unwrap();
        assert_eq!(s.read(ino, fh, 0, 10).unwrap(), b"abc");
        s.release(fh);
        assert!(s.node(ino).is_err());
        s.cut();
        assert_eq!(
            s.child(ROOT, OsStr::new("f")),
            Ok(ino),
            "the unlink was never synced"
        );
        assert_eq!(file(&s, ino), b"abc");
    }

    #[test]
    fn a_directory_reachable_twice_after_a_cut_keeps_one_name() {
        let mut s = State::new(0, 0);
        let meta = Meta::new(0o755, 0, 0);
        let a = s
            .create(ROOT, OsStr::new("a"), Body::Dir(BTreeMap::new()), meta)
            .unwrap();
        let b = s
            .create(ROOT, OsStr::new("b"), Body::Dir(BTreeMap::new()), meta)
            .unwrap();
        let d = s
            .create(a, OsStr::new("d"), Body::Dir(BTreeMap::new()), meta)
            .unwrap();
        for dir in [ROOT, a] {
            let fh = s.open(dir).unwrap();
            s.fsyncdir(dir, fh).unwrap();
        }
        s.rename(a, OsStr::new("d"), b, OsStr::new("d"), RenameFlags::empty())
            .unwrap();
        let fh = s.open(b).unwrap();
        s.fsyncdir(b, fh).unwrap();
        s.cut();
        let names = [s.entries(a).unwrap().len(), s.entries(b).unwrap().len()];
        assert_eq!(names.iter().sum::<usize>(), 1, "{names:?}");
        assert!(s.node(d).is_ok());
    }
}
