//! The exponent encodings kept in a file between loads: what [`super::compress`] makes at a
//! load (one core encodes about 300 MB/s of bf16: seconds for a 13 GB model, minutes for
//! 80 GB) is written once, and the next load maps the file instead of encoding again.
//!
//! Where: beside the model, `<folder of its weight files>/.ferry-encodings/<the first file's
//! name>.enc`; where that cannot be written (a read-only model folder), in the user's
//! cache, `$FERRY_CACHE/encodings/<name>-<hash of the file's canonical path>.enc`
//! (`$FERRY_CACHE` defaults to `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`, as for the
//! models `scripts/fetch_smollm2.sh` fetches). A load looks in both, beside first.
//!
//! Format ([`VERSION`]), little-endian:
//! `[header: 64 bytes][entries, each at a multiple of ENTRY_ALIGN][index: JSON]`. The header
//! is the magic `FERRYENC`, the version (u32), 0 (u32), then the index's offset, length and
//! [`checksum`] (u64 each), and zeros. The index holds the encoder's parameters; each weight
//! file's name, size and modification time (ns); and each tensor's name, dtype, shape and
//! segment, with, where it is encoded (a tensor whose encoding is no smaller than it is
//! recorded as such), its exponent bits, its entry's byte range in the file, the byte range
//! of each part within the entry (table, lane starts, sign-mantissa bytes, exponent words)
//! and the checksum of its bytes. An entry is one encoding's storage exactly as
//! [`EncodedTensor::encode`] lays it out.
//!
//! Trust: a file is *stale* when another format version or encoder wrote it, or the weight
//! files differ from those it was made of in name, size or mtime; it is *corrupt* when it is
//! not what ferry writes: a wrong magic, a truncated file, an index that does not match its
//! checksum or does not parse, ranges that overlap, leave the file or differ from the layout
//! the tensor's geometry implies, an entry whose bytes do not match their checksum. Either
//! way it is not used, said so in one line on stderr (by the caller, from [`CacheUse`]), the
//! tensors are encoded again and the file rewritten. Every entry used is checked against
//! its checksum at every load (that reads it once, as page-locking it would anyway).
//!
//! Growing: a load that misses encodes, beside the tensors it streams, every other tensor of
//! its model that could stream ([`EncodingCache::encodings_ahead`]: what other budgets, pass
//! shapes or the planner's later rounds would stream) and of the models its caller says
//! will load from the same files later (Qwen-Image's and Flux's DiT after their modulation
//! model: `StreamSetup::siblings`), so that one write serves them all; a later load that
//! still lacks some encodes only the tensors missing and rewrites the file with the union,
//! through a temporary file renamed over the old one. A stale or corrupt file is removed
//! before its replacement is written. Why not append in place: another ferry may have the
//! file mapped, and an index rewritten in place could be read torn; a rename leaves every
//! mapping whole and a reader sees the old file or the new, never half of one. The cost, a
//! copy of the entries already there, is paid once for each budget that streams more than
//! any before. Nothing is synced to disk: a file torn by a crash reads as corrupt and is
//! rebuilt.
//!
//! Each entry is mapped on its own (offsets are page multiples), so its storage is a file
//! mapping of exactly the encoding, as a fresh encoding is an anonymous one: the host tier
//! page-locks it the same way (`register_compressed`), and only the entries this load
//! streams are mapped, checked and locked.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::compress::{
    EncodedTensor, ExponentJob, Geometry, Parts, LANES, LANE_ELEMENTS, LUT_BYTES, MAX_CODE_BITS,
    PAD_WORDS,
};
use crate::checkpoint::Storage;
use crate::error::Result;

/// The format version this ferry writes and reads.
pub const VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"FERRYENC";
/// Bytes of the header.
const HEADER: usize = 64;
/// Entries start at multiples of this many bytes: a page on every host ferry runs on (4 KiB
/// on x86-64, up to 64 KiB on arm64), so that each maps on its own.
pub const ENTRY_ALIGN: usize = 64 << 10;
/// Largest index read, bytes (a file claiming more is corrupt): about 200 bytes a tensor.
const MAX_INDEX: u64 = 256 << 20;

/// `--encoding-cache`: whether exponent encodings are kept in a file between loads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    #[default]
    On,
    /// Encode at every load; read and write no file.
    Off,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "on" => Ok(CacheMode::On),
            "off" => Ok(CacheMode::Off),
            _ => Err(format!("expected on or off, got {s:?}")),
        }
    }
}

/// Where the encodings of the tensors read from some weight files are cached.
#[derive(Clone, Debug)]
pub struct EncodingCache {
    /// The weight files the tensors are read from.
    files: Vec<PathBuf>,
    /// Where the cache file may be, in the order looked in and written to.
    places: Vec<PathBuf>,
}

impl EncodingCache {
    /// The cache for tensors read from `files` (the module's doc says where); `None` when
    /// there are none (weights made in memory).
    pub fn for_files(files: &[PathBuf]) -> Option<EncodingCache> {
        // Named after the first by name (`model-00001-of-00004.safetensors`), whatever order
        // an index lists the shards in.
        let first = files.iter().min_by_key(|p| p.file_name())?;
        let name = first.file_name()?.to_string_lossy().to_string();
        let folder = first.parent().unwrap_or(Path::new(""));
        let mut places = vec![folder.join(".ferry-encodings").join(format!("{name}.enc"))];
        if let Some(root) = user_cache_dir() {
            let canonical = std::fs::canonicalize(first).unwrap_or_else(|_| first.clone());
            let hash = checksum(canonical.as_os_str().as_encoded_bytes());
            places.push(
                root.join("encodings")
                    .join(format!("{name}-{hash:016x}.enc")),
            );
        }
        Some(EncodingCache::at(files, places))
    }

    /// The cache for tensors read from `files`, kept at the first of `places` that can be
    /// written (each a file's path), looked for in all of them in order.
    pub fn at(files: &[PathBuf], places: Vec<PathBuf>) -> EncodingCache {
        EncodingCache {
            files: files.to_vec(),
            places,
        }
    }

    /// Where the cache file may be, in the order looked in.
    pub fn places(&self) -> &[PathBuf] {
        &self.places
    }

    /// The encodings of `jobs`' tensors (as [`ExponentJob::encode`] gives them): those the
    /// cache holds, checked, and the others encoded on every core; the file is written when
    /// it lacked any. Errors are the encoder's only: a cache that cannot be read or written
    /// is reported in the [`CacheUse`].
    pub fn encodings(
        &self,
        jobs: &[ExponentJob<'_>],
    ) -> Result<(Vec<Option<EncodedTensor>>, CacheUse)> {
        self.encodings_ahead(jobs, &[])
    }

    /// [`encodings`](Self::encodings) of `jobs`; when the file lacks any of them, the
    /// tensors of `ahead` that it lacks too (what would stream at other budgets, or in the
    /// other rounds of one load's planning) are encoded beside them and written in the same
    /// file, so that a later load streaming those reads them instead of rewriting the whole
    /// file again. Only `jobs`' encodings are returned.
    pub fn encodings_ahead(
        &self,
        jobs: &[ExponentJob<'_>],
        ahead: &[ExponentJob<'_>],
    ) -> Result<(Vec<Option<EncodedTensor>>, CacheUse)> {
        let mut rejected = Vec::new();
        let sources = match self.sources() {
            Ok(s) => s,
            Err(why) => {
                let encoded = super::compress::encode_jobs(jobs)?;
                let done = CacheUse {
                    read_from: None,
                    rejected,
                    read: 0,
                    encoded: jobs.len(),
                    encoded_ahead: 0,
                    written: Written::Nowhere(why),
                };
                return Ok((encoded, done));
            }
        };
        // The first file that passes its checks, with what it holds of the jobs.
        let mut found: Option<(CacheFile, Vec<Option<Option<EncodedTensor>>>)> = None;
        for place in &self.places {
            match CacheFile::open(place, &sources) {
                Ok(None) => {}
                Ok(Some(file)) => match file.take(jobs) {
                    Ok(held) => {
                        found = Some((file, held));
                        break;
                    }
                    Err(why) => rejected.push(Rejected::corrupt(place, why)),
                },
                Err(r) => rejected.push(r),
            }
        }
        let (file, mut held) = match found {
            Some((f, h)) => (Some(f), h),
            None => (None, vec![None; jobs.len()]),
        };
        let missing: Vec<usize> = (0..jobs.len()).filter(|&k| held[k].is_none()).collect();
        // On a miss, what the file lacks of `ahead` too (not among the jobs).
        let extra: Vec<ExponentJob<'_>> = match missing.is_empty() {
            true => Vec::new(),
            false => {
                let mut known: HashSet<Key> = jobs.iter().map(Key::of).collect();
                if let Some(f) = &file {
                    known.extend(f.index.tensors.iter().map(Entry::key));
                }
                ahead
                    .iter()
                    .filter(|j| known.insert(Key::of(j)))
                    .copied()
                    .collect()
            }
        };
        let to_encode: Vec<ExponentJob<'_>> = missing
            .iter()
            .map(|&k| jobs[k])
            .chain(extra.iter().copied())
            .collect();
        let mut fresh: Vec<Option<EncodedTensor>> = to_encode
            .par_iter()
            .map(|j| j.encode())
            .collect::<Result<_>>()?;
        let extra_encodings = fresh.split_off(missing.len());
        for (&k, e) in missing.iter().zip(fresh) {
            held[k] = Some(e);
        }
        let encodings: Vec<Option<EncodedTensor>> = held.into_iter().flatten().collect();
        let written = if missing.is_empty() {
            Written::NotNeeded
        } else {
            let all_jobs: Vec<ExponentJob<'_>> = jobs.iter().chain(&extra).copied().collect();
            let all: Vec<Option<EncodedTensor>> =
                encodings.iter().cloned().chain(extra_encodings).collect();
            self.write(&sources, &all_jobs, &all, file.as_ref(), &mut rejected)
        };
        let done = CacheUse {
            read_from: file.as_ref().map(|f| f.path.clone()),
            rejected,
            read: jobs.len() - missing.len(),
            encoded: missing.len(),
            encoded_ahead: extra.len(),
            written,
        };
        Ok((encodings, done))
    }

    /// The weight files as they are now, or why they cannot be known.
    fn sources(&self) -> std::result::Result<Vec<SourceFile>, String> {
        self.files
            .iter()
            .map(|p| SourceFile::stat(p).map_err(|e| format!("{}: {e}", p.display())))
            .collect()
    }

    /// Write the encodings of `jobs`, and those of `old` no job asked for (checked), to the
    /// first place that takes them.
    fn write(
        &self,
        sources: &[SourceFile],
        jobs: &[ExponentJob<'_>],
        encodings: &[Option<EncodedTensor>],
        old: Option<&CacheFile>,
        rejected: &mut Vec<Rejected>,
    ) -> Written {
        // What goes in: each job's tensor once, then the old file's others.
        let mut keys: HashSet<Key> = HashSet::new();
        let mut items: Vec<(Key, Option<Content>)> = Vec::new();
        for (job, e) in jobs.iter().zip(encodings) {
            let key = Key::of(job);
            if keys.insert(key.clone()) {
                items.push((key, e.as_ref().map(Content::Fresh)));
            }
        }
        if let Some(old) = old {
            let carried: Vec<&Entry> = old
                .index
                .tensors
                .iter()
                .filter(|e| !keys.contains(&e.key()))
                .collect();
            let checked: Vec<std::result::Result<Option<Content>, String>> = carried
                .par_iter()
                .map(|e| match &e.encoded {
                    None => Ok(None),
                    Some(span) => old
                        .map_checked(&e.name, span)
                        .map(|s| Some(Content::Carried(s, span.bits, span.checksum))),
                })
                .collect();
            for (e, c) in carried.into_iter().zip(checked) {
                match c {
                    Ok(content) => items.push((e.key(), content)),
                    // The file was good for this load's tensors; one it kept for another is
                    // not: left out of the new file.
                    Err(why) => rejected.push(Rejected::corrupt(&old.path, why)),
                }
            }
        }
        let checksums: Vec<u64> = items
            .par_iter()
            .map(|(_, c)| c.as_ref().map_or(0, Content::checksum))
            .collect();
        let mut at = ENTRY_ALIGN;
        let mut tensors = Vec::with_capacity(items.len());
        for ((key, content), sum) in items.iter().zip(checksums) {
            let encoded = content.as_ref().map(|c| {
                let bytes = c.bytes();
                let geometry = Geometry {
                    numel: key.numel(),
                    segment: key.segment,
                };
                let p = Parts::of(geometry, c.bits());
                let span = Span {
                    at: at as u64,
                    len: bytes.len() as u64,
                    bits: c.bits(),
                    parts: [
                        [0, LUT_BYTES as u64],
                        [p.starts_at as u64, p.sm_at as u64],
                        [p.sm_at as u64, (p.sm_at + geometry.numel) as u64],
                        [p.words_at as u64, p.total as u64],
                    ],
                    checksum: sum,
                };
                at = (at + bytes.len()).div_ceil(ENTRY_ALIGN) * ENTRY_ALIGN;
                span
            });
            tensors.push(Entry {
                name: key.name.clone(),
                dtype: key.dtype.clone(),
                shape: key.shape.clone(),
                numel: key.numel(),
                segment: key.segment,
                encoded,
            });
        }
        let index = Index {
            encoder: Encoder::this(),
            files: sources.to_vec(),
            tensors,
        };
        let contents: Vec<Option<&[u8]>> = items
            .iter()
            .map(|(_, c)| c.as_ref().map(Content::bytes))
            .collect();
        if old.is_none() {
            // A file found stale or corrupt is of no use: removed before the new one is
            // written, so that the disk never holds both (a 14 GB cache took 28 GB to rebuild).
            for r in rejected.iter().filter(|r| self.places.contains(&r.path)) {
                let _ = std::fs::remove_file(&r.path);
            }
        }
        let mut failures = Vec::new();
        for place in &self.places {
            match write_file(place, &index, &contents) {
                Ok(()) => return Written::To(place.clone()),
                Err(e) => failures.push(format!("{}: {e}", place.display())),
            }
        }
        Written::Nowhere(if failures.is_empty() {
            "no place to write it".into()
        } else {
            failures.join("; ")
        })
    }
}

/// `$FERRY_CACHE`, else `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`.
fn user_cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("FERRY_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("ferry")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/ferry")))
}

/// What a load did with the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheUse {
    /// The file the encodings read came from.
    pub read_from: Option<PathBuf>,
    /// Files found and not used.
    pub rejected: Vec<Rejected>,
    /// Tensors whose encodings (or the word that they are not worth encoding) came from the
    /// file.
    pub read: usize,
    /// Tensors encoded at this load.
    pub encoded: usize,
    /// Tensors this load does not stream, encoded with them for later loads
    /// ([`EncodingCache::encodings_ahead`]).
    pub encoded_ahead: usize,
    pub written: Written,
}

impl CacheUse {
    /// Every tensor came from the file, and nothing was rejected or written.
    pub fn is_hit(&self) -> bool {
        self.read_from.is_some()
            && self.encoded == 0
            && self.rejected.is_empty()
            && self.written == Written::NotNeeded
    }

    /// One line each for stderr: the files rejected, then what was read, encoded, written.
    pub fn messages(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .rejected
            .iter()
            .map(|r| {
                format!(
                    "[encodings cache: {} is {} ({}); not used]",
                    r.path.display(),
                    r.kind,
                    r.why
                )
            })
            .collect();
        if let Some(p) = &self.read_from {
            out.push(format!(
                "[encodings cache: {} tensors read from {}]",
                self.read,
                p.display()
            ));
        }
        match &self.written {
            Written::NotNeeded => {}
            Written::To(p) => out.push(format!(
                "[encodings cache: {} tensors encoded{}, written to {}]",
                self.encoded,
                match self.encoded_ahead {
                    0 => String::new(),
                    n => format!(" and {n} more for later loads (other budgets or models in these files)"),
                },
                p.display()
            )),
            Written::Nowhere(why) => out.push(format!(
                "[encodings cache: {} tensors encoded, not cached (they will be encoded at every load): {why}]",
                self.encoded
            )),
        }
        out
    }
}

/// Whether and where a load wrote the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// The file held every tensor.
    NotNeeded,
    To(PathBuf),
    /// No place could be written, and why.
    Nowhere(String),
}

/// A cache file found and not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub path: PathBuf,
    pub kind: Rejection,
    pub why: String,
}

impl Rejected {
    fn stale(path: &Path, why: impl Into<String>) -> Rejected {
        Rejected {
            path: path.to_path_buf(),
            kind: Rejection::Stale,
            why: why.into(),
        }
    }

    fn corrupt(path: &Path, why: impl Into<String>) -> Rejected {
        Rejected {
            path: path.to_path_buf(),
            kind: Rejection::Corrupt,
            why: why.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Made for other weight files, by another format version or encoder.
    Stale,
    /// Not what ferry writes.
    Corrupt,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rejection::Stale => "stale",
            Rejection::Corrupt => "corrupt",
        })
    }
}

/// A weight file as the index records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SourceFile {
    name: String,
    /// Bytes.
    size: u64,
    /// Modification time, ns since the Unix epoch (negative before).
    mtime_ns: i64,
}

impl SourceFile {
    fn stat(path: &Path) -> std::io::Result<SourceFile> {
        let m = std::fs::metadata(path)?;
        let mtime = m.modified()?;
        let mtime_ns = match mtime.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            Err(e) => -(e.duration().as_nanos() as i64),
        };
        Ok(SourceFile {
            name: path
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().to_string()),
            size: m.len(),
            mtime_ns,
        })
    }
}

/// The encoder's parameters that shape an encoding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Encoder {
    max_code_bits: u32,
    lanes: usize,
    lane_elements: usize,
    lut_bytes: usize,
    pad_words: usize,
}

impl Encoder {
    fn this() -> Encoder {
        Encoder {
            max_code_bits: MAX_CODE_BITS,
            lanes: LANES,
            lane_elements: LANE_ELEMENTS,
            lut_bytes: LUT_BYTES,
            pad_words: PAD_WORDS,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Index {
    encoder: Encoder,
    files: Vec<SourceFile>,
    tensors: Vec<Entry>,
}

/// One tensor of the index.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    numel: usize,
    /// Elements per segment ([`Geometry`]).
    segment: usize,
    /// `None`: its encoding is no smaller than it, so it streams as it is.
    encoded: Option<Span>,
}

impl Entry {
    fn key(&self) -> Key {
        Key {
            name: self.name.clone(),
            dtype: self.dtype.clone(),
            shape: self.shape.clone(),
            segment: self.segment,
        }
    }
}

/// Where an encoding lies in the file.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Span {
    /// Bytes from the start of the file, and bytes of the entry.
    at: u64,
    len: u64,
    /// Bits of the exponent stream.
    bits: u64,
    /// `[start, end)` of the table, lane starts, sign-mantissa bytes and exponent words
    /// (padding included), bytes from the entry's start.
    parts: [[u64; 2]; 4],
    /// [`checksum`] of the entry's bytes.
    checksum: u64,
}

/// What identifies an encoding: the tensor as the load holds it, and how it is cut.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    segment: usize,
}

impl Key {
    fn of(job: &ExponentJob<'_>) -> Key {
        Key {
            name: job.tensor.name.clone(),
            dtype: job.tensor.dtype.name().to_string(),
            shape: job.tensor.shape.clone(),
            segment: job.segment,
        }
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An encoding to write: made at this load, or carried over from the old file (its storage,
/// bits and checksum).
enum Content<'a> {
    Fresh(&'a EncodedTensor),
    Carried(Arc<Storage>, u64, u64),
}

impl Content<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Content::Fresh(e) => e.storage.bytes(),
            Content::Carried(s, ..) => s.bytes(),
        }
    }

    fn bits(&self) -> u64 {
        match self {
            Content::Fresh(e) => e.bits,
            Content::Carried(_, bits, _) => *bits,
        }
    }

    fn checksum(&self) -> u64 {
        match self {
            Content::Fresh(e) => checksum(e.storage.bytes()),
            Content::Carried(_, _, sum) => *sum,
        }
    }
}

/// A cache file whose header and index passed their checks.
struct CacheFile {
    path: PathBuf,
    file: File,
    index: Index,
}

impl CacheFile {
    /// The file at `path`, checked against the weight files `sources`: `None` when there is
    /// none, an error saying why it is stale or corrupt.
    fn open(
        path: &Path,
        sources: &[SourceFile],
    ) -> std::result::Result<Option<CacheFile>, Rejected> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            // Nothing there: no file, or a file where a folder of the path would be.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(Rejected::corrupt(path, format!("cannot be read: {e}"))),
        };
        let corrupt = |why: String| Rejected::corrupt(path, why);
        let len = file
            .metadata()
            .map_err(|e| corrupt(format!("cannot be read: {e}")))?
            .len();
        let mut header = [0u8; HEADER];
        if len < HEADER as u64 {
            return Err(corrupt(format!("{len} bytes, shorter than a header")));
        }
        file.read_exact(&mut header)
            .map_err(|e| corrupt(format!("cannot be read: {e}")))?;
        if &header[..8] != MAGIC {
            return Err(corrupt("not an encodings cache (wrong magic)".into()));
        }
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(Rejected::stale(
                path,
                format!("format version {version}, this ferry reads {VERSION}"),
            ));
        }
        let (index_at, index_len, index_sum) = (word(16), word(24), word(32));
        if index_len > MAX_INDEX
            || index_at < HEADER as u64
            || index_at.checked_add(index_len) != Some(len)
        {
            return Err(corrupt(format!(
                "the index at {index_at} ({index_len} bytes) does not end the file of {len} bytes (truncated?)"
            )));
        }
        let mut text = vec![0u8; index_len as usize];
        file.seek(SeekFrom::Start(index_at))
            .and_then(|_| file.read_exact(&mut text))
            .map_err(|e| corrupt(format!("cannot be read: {e}")))?;
        if checksum(&text) != index_sum {
            return Err(corrupt("the index does not match its checksum".into()));
        }
        let index: Index = serde_json::from_slice(&text)
            .map_err(|e| corrupt(format!("the index does not parse: {e}")))?;
        if index.encoder != Encoder::this() {
            return Err(Rejected::stale(path, "made by another encoder"));
        }
        if index.files != sources {
            return Err(Rejected::stale(path, stale_files(&index.files, sources)));
        }
        check_spans(&index.tensors, index_at).map_err(corrupt)?;
        Ok(Some(CacheFile {
            path: path.to_path_buf(),
            file,
            index,
        }))
    }

    /// For each job, what the file holds of its tensor (`Some(None)`: not worth encoding),
    /// each entry mapped and checked against its checksum; `None` where it holds nothing.
    /// An error says which entry is corrupt.
    fn take(
        &self,
        jobs: &[ExponentJob<'_>],
    ) -> std::result::Result<Vec<Option<Option<EncodedTensor>>>, String> {
        let by_key: HashMap<Key, usize> = self
            .index
            .tensors
            .iter()
            .enumerate()
            .map(|(i, e)| (e.key(), i))
            .collect();
        let found: Vec<Option<usize>> = jobs
            .iter()
            .map(|j| by_key.get(&Key::of(j)).copied())
            .collect();
        // Each entry mapped once, however many jobs name it (a tied embedding).
        let mut wanted: Vec<usize> = found.iter().flatten().copied().collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mapped: Vec<(usize, Option<Arc<Storage>>)> = wanted
            .par_iter()
            .map(|&i| {
                let e = &self.index.tensors[i];
                match &e.encoded {
                    None => Ok((i, None)),
                    Some(span) => self.map_checked(&e.name, span).map(|s| (i, Some(s))),
                }
            })
            .collect::<std::result::Result<_, String>>()?;
        let mapped: HashMap<usize, Option<Arc<Storage>>> = mapped.into_iter().collect();
        Ok(found
            .iter()
            .map(|f| {
                let i = (*f)?;
                let e = &self.index.tensors[i];
                let encoding = match (&mapped[&i], &e.encoded) {
                    (Some(storage), Some(span)) => {
                        let geometry = Geometry {
                            numel: e.numel,
                            segment: e.segment,
                        };
                        // The span's length was checked against this layout.
                        EncodedTensor::from_parts(&e.name, geometry, storage.clone(), span.bits)
                    }
                    _ => None,
                };
                Some(encoding)
            })
            .collect())
    }

    /// The entry at `span` mapped on its own, once its bytes match their checksum.
    fn map_checked(&self, name: &str, span: &Span) -> std::result::Result<Arc<Storage>, String> {
        let map = Storage::map_range(&self.file, span.at, span.len as usize)
            .map_err(|e| format!("{name}: cannot be mapped: {e}"))?;
        if checksum(map.bytes()) != span.checksum {
            return Err(format!("{name}: its bytes do not match their checksum"));
        }
        Ok(Arc::new(map))
    }
}

/// Which weight file differs between the index's `then` and `now`, in words.
fn stale_files(then: &[SourceFile], now: &[SourceFile]) -> String {
    if then.len() != now.len() {
        return format!("made for {} weight files, not {}", then.len(), now.len());
    }
    for (a, b) in then.iter().zip(now) {
        if a.name != b.name {
            return format!("made for {}, not {}", a.name, b.name);
        }
        if a.size != b.size {
            return format!("{} was {} bytes, now {}", a.name, a.size, b.size);
        }
        if a.mtime_ns != b.mtime_ns {
            return format!("{} was modified since", a.name);
        }
    }
    "made for other weight files".into()
}

/// Every entry's ranges as the writer makes them: its layout is the one its geometry and
/// bits imply, it lies between the header and the index at `end`, at a multiple of
/// [`ENTRY_ALIGN`], and no two overlap; names with their cut are unique.
fn check_spans(tensors: &[Entry], end: u64) -> std::result::Result<(), String> {
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    let mut keys: HashSet<Key> = HashSet::new();
    for e in tensors {
        let bad = |what: &str| format!("{}: {what}", e.name);
        if !keys.insert(e.key()) {
            return Err(bad("listed twice"));
        }
        let numel = e.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if numel != Some(e.numel) {
            return Err(bad("its element count is not its shape's"));
        }
        let cut = if e.numel == 0 {
            e.segment == 0
        } else {
            e.segment > 0 && e.numel % e.segment == 0
        };
        if !cut {
            return Err(bad("its segments do not tile it"));
        }
        let Some(span) = &e.encoded else { continue };
        // Every element has a sign-mantissa byte in the entry: a count beyond the file is
        // impossible, and bounding it keeps the layout's arithmetic from overflowing.
        let bits_ok = span.bits >= e.numel as u64
            && span.bits <= (e.numel as u64).saturating_mul(u64::from(MAX_CODE_BITS))
            && span.bits < 1 << 32;
        if e.numel as u64 > end || !bits_ok {
            return Err(bad("impossible element or bit count"));
        }
        let p = Parts::of(
            Geometry {
                numel: e.numel,
                segment: e.segment,
            },
            span.bits,
        );
        let parts = [
            [0, LUT_BYTES as u64],
            [p.starts_at as u64, p.sm_at as u64],
            [p.sm_at as u64, (p.sm_at + e.numel) as u64],
            [p.words_at as u64, p.total as u64],
        ];
        if span.parts != parts || span.len != p.total as u64 {
            return Err(bad("its parts are not where its layout puts them"));
        }
        let fits = span.at >= HEADER as u64
            && span.at % ENTRY_ALIGN as u64 == 0
            && span.at.checked_add(span.len).is_some_and(|e| e <= end);
        if !fits {
            return Err(bad("its bytes lie outside the entries"));
        }
        spans.push((span.at, span.at + span.len, &e.name));
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!("{} and {} overlap", w[0].2, w[1].2));
        }
    }
    Ok(())
}

/// Write `index` and the entries' `contents` (in the index's order; `None` for a tensor not
/// encoded) to `path`, through a temporary file renamed over it.
fn write_file(path: &Path, index: &Index, contents: &[Option<&[u8]>]) -> std::io::Result<()> {
    let folder = path.parent().unwrap_or(Path::new(""));
    std::fs::create_dir_all(folder)?;
    let name = path
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().to_string());
    let stem = format!(".{name}.tmp");
    remove_orphans(folder, &stem);
    let tmp = folder.join(format!("{stem}{}", std::process::id()));
    let result = (|| {
        let text = serde_json::to_vec(index).expect("the index serializes");
        let end = index
            .tensors
            .iter()
            .filter_map(|e| e.encoded.map(|s| s.at + s.len))
            .max()
            .unwrap_or(HEADER as u64);
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[16..24].copy_from_slice(&end.to_le_bytes());
        header[24..32].copy_from_slice(&(text.len() as u64).to_le_bytes());
        header[32..40].copy_from_slice(&checksum(&text).to_le_bytes());
        let mut out = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        out.write_all(&header)?;
        let mut at = HEADER as u64;
        let zeros = vec![0u8; ENTRY_ALIGN];
        for (e, bytes) in index.tensors.iter().zip(contents) {
            let (Some(span), Some(bytes)) = (&e.encoded, bytes) else {
                continue;
            };
            out.write_all(&zeros[..(span.at - at) as usize])?;
            out.write_all(bytes)?;
            at = span.at + span.len;
        }
        out.write_all(&text)?;
        out.flush()?;
        drop(out);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Remove the temporary files `{stem}{pid}` in `folder` that a ferry killed while writing
/// left behind (a process that no longer runs: `/proc/{pid}` is gone). Each is as large as the
/// cache it would have become, so a few killed runs would fill the disk. Where processes
/// cannot be looked up (no `/proc`), nothing is removed.
fn remove_orphans(folder: &Path, stem: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(stem)) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| Path::new("/proc").join(p.to_string()).exists());
        if !alive && pid.chars().all(|c| c.is_ascii_digit()) && !pid.is_empty() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A 64-bit checksum of `bytes`: four lanes over 8-byte words, each step xxHash64's round
/// (multiply, rotate, multiply; written here, not xxHash itself), then the lanes, the tail
/// and the length folded and mixed. Each step is a bijection of the lane's state, so any
/// change to one word changes the sum; several GB/s on one core, so that every entry used
/// can be checked at every load.
pub fn checksum(bytes: &[u8]) -> u64 {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const P3: u64 = 0x1656_67B1_9E37_79F9;
    let round = |acc: u64, w: u64| {
        acc.wrapping_add(w.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    };
    let mut lanes = [P1.wrapping_add(P2), P2, 0, P1.wrapping_neg()];
    let chunks = bytes.chunks_exact(32);
    let tail = chunks.remainder();
    for c in chunks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(c[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            *lane = round(*lane, w);
        }
    }
    let mut h = (bytes.len() as u64).wrapping_mul(P3);
    for lane in lanes {
        h = (h ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P3);
    }
    for &b in tail {
        h = (h ^ u64::from(b)).wrapping_mul(P1).rotate_left(11);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_sees_every_flipped_bit_and_the_length() {
        let bytes: Vec<u8> = (0..203u32).map(|i| (i * 37 % 251) as u8).collect();
        let sum = checksum(&bytes);
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert_ne!(checksum(&b), sum, "byte {i} bit {bit}");
            }
        }
        assert_ne!(checksum(&bytes[..202]), sum);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_ne!(checksum(&longer), sum);
        assert_ne!(checksum(&[]), checksum(&[0]));
    }
}
