//! The exponent encodings cache on the CPU: written at the first load, read (not encoded) at
//! the next, byte for byte what a fresh encoding gives; stale and corrupt files detected,
//! reported and rebuilt; a model folder that cannot be written falls back; grown with the
//! union when more groups stream; and a streamed pass from cached encodings equals the
//! resident one bit for bit.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry::backend::cpu_stream::SLOT_ALIGN;
use ferry::checkpoint::Storage;
use ferry::model::{Architecture, Checkpoint, Llama};
use ferry::runtime::ASSUMED_DECODE;
use ferry::stream::compress::{encode_jobs, Compressed, EncodedTensor, ExponentJob};
use ferry::stream::encoding_cache::{
    checksum, CacheUse, EncodingCache, Rejection, Written, ENTRY_ALIGN,
};
use ferry::stream::GroupTensors;
use ferry::synth::{write_checkpoint, Preset, WriteOptions};

/// A bf16 Llama written to `dir` in two shards, with tensors large enough to compress
/// (hidden 256, 4 blocks, vocab 4096; the head compresses in rows).
fn write_model(dir: &Path) -> Checkpoint {
    let mut p = Preset::by_name("tiny").unwrap();
    p.config.hidden_size = 256;
    p.config.intermediate_size = 768;
    p.config.num_layers = 4;
    p.config.head_dim = 64;
    p.config.vocab_size = 4096;
    let opts = WriteOptions {
        seed: 5,
        shard_bytes: 4 << 20,
        ..WriteOptions::default()
    };
    let report = write_checkpoint(&p, dir, &opts).unwrap();
    assert!(report.shards.len() > 1, "two shards or more");
    Checkpoint::open(dir.to_str().unwrap()).unwrap()
}

/// A model on disk, its groups, and a cache at `places` (the first beside the model).
struct Fixture {
    _tmp: tempfile::TempDir,
    model_dir: PathBuf,
    ckpt: Checkpoint,
    arch: Llama,
    tensors: GroupTensors,
    places: Vec<PathBuf>,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let model_dir = tmp.path().join("model");
        let ckpt = write_model(&model_dir);
        let arch = Llama::new(ckpt.config.clone());
        let tensors = GroupTensors::of(&ckpt, &arch).unwrap();
        let name = ckpt
            .stored
            .files
            .iter()
            .filter_map(|p| p.file_name())
            .min()
            .unwrap()
            .to_owned();
        let places = vec![
            model_dir
                .join(".ferry-encodings")
                .join(format!("{}.enc", name.to_string_lossy())),
            tmp.path().join("user-cache/encodings/model.enc"),
        ];
        Fixture {
            _tmp: tmp,
            model_dir,
            ckpt,
            arch,
            tensors,
            places,
        }
    }

    fn cache(&self) -> EncodingCache {
        EncodingCache::at(&self.ckpt.stored.files, self.places.clone())
    }

    fn beside(&self) -> &Path {
        &self.places[0]
    }

    fn compressed(&self) -> Compressed {
        Compressed::blocks(&self.tensors.groups, false, SLOT_ALIGN, ASSUMED_DECODE)
    }

    /// The jobs of the groups `keep` holds of (every streamable group: not the host-gathered
    /// embedding).
    fn jobs<'a>(&'a self, c: &Compressed, keep: impl Fn(usize) -> bool) -> Vec<ExponentJob<'a>> {
        let gather: Vec<bool> = self.arch.groups().iter().map(|g| g.host_gather).collect();
        c.exponent_jobs(
            &self.tensors.groups,
            &self.tensors.splits,
            |g| !gather[g] && keep(g),
            false,
        )
    }

    fn load(&self, keep: impl Fn(usize) -> bool) -> (Vec<Option<EncodedTensor>>, CacheUse) {
        let c = self.compressed();
        let jobs = self.jobs(&c, keep);
        self.cache().encodings(&jobs).unwrap()
    }

    fn fresh(&self, keep: impl Fn(usize) -> bool) -> Vec<Option<EncodedTensor>> {
        let c = self.compressed();
        encode_jobs(&self.jobs(&c, keep)).unwrap()
    }
}

fn all(_: usize) -> bool {
    true
}

/// Same tensors encoded or not, and every encoding's bytes, bits and geometry the same.
fn assert_same(got: &[Option<EncodedTensor>], want: &[Option<EncodedTensor>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: tensors");
    assert!(
        want.iter().filter(|e| e.is_some()).count() >= 10,
        "{what}: most tensors are encoded"
    );
    for (g, w) in got.iter().zip(want) {
        match (g, w) {
            (None, None) => {}
            (Some(g), Some(w)) => {
                assert_eq!(g.name, w.name, "{what}");
                assert_eq!(g.geometry, w.geometry, "{what}: {}", g.name);
                assert_eq!(g.bits, w.bits, "{what}: {}", g.name);
                assert!(
                    g.storage.bytes() == w.storage.bytes(),
                    "{what}: {}: the encodings differ",
                    g.name
                );
            }
            _ => panic!("{what}: encoded in one and not the other"),
        }
    }
}

/// Written on the first load (nothing read), then a pure hit.
fn assert_written_then_hit(f: &Fixture, at: &Path, what: &str) {
    let (_, first) = f.load(all);
    assert_eq!(
        first.written,
        Written::To(at.to_path_buf()),
        "{what}: {first:?}"
    );
    let (got, second) = f.load(all);
    assert!(second.is_hit(), "{what}: then read: {second:?}");
    assert_eq!(second.read_from.as_deref(), Some(at), "{what}");
    assert_same(&got, &f.fresh(all), what);
}

#[test]
fn the_cache_is_written_then_read_and_equals_a_fresh_encoding() {
    let f = Fixture::new();
    let fresh = f.fresh(all);

    let (first, used) = f.load(all);
    assert_same(&first, &fresh, "first load");
    assert_eq!(used.read_from, None);
    assert!(used.rejected.is_empty());
    assert_eq!((used.read, used.encoded), (0, fresh.len()));
    assert_eq!(used.written, Written::To(f.beside().to_path_buf()));
    assert!(f.beside().is_file());
    assert!(!f.places[1].exists(), "the user's cache is not written");

    let (second, used) = f.load(all);
    assert!(used.is_hit(), "{used:?}");
    assert_eq!((used.read, used.encoded), (fresh.len(), 0));
    assert_same(&second, &fresh, "read from the cache");
    // Each encoding is a mapping of the cache file, page-aligned like a fresh one.
    for e in second.iter().flatten() {
        assert!(matches!(*e.storage, Storage::Mapped(_)));
        assert_eq!(e.storage.bytes().as_ptr() as usize % 4096, 0, "{}", e.name);
    }
    let lines = used.messages();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("read from") && lines[0].contains(".ferry-encodings"));

    // The runtime's places: beside the first weight file first.
    let cache = EncodingCache::for_files(&f.ckpt.stored.files).unwrap();
    assert_eq!(cache.places()[0], *f.beside());
    assert!(
        EncodingCache::for_files(&[]).is_none(),
        "weights made in memory"
    );
}

#[test]
fn a_stale_cache_is_rebuilt() {
    let f = Fixture::new();
    f.load(all);
    let shard = f.ckpt.stored.files[1].clone();

    // A weight file touched: its mtime differs.
    let later = SystemTime::now() + Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let (got, used) = f.load(all);
    assert_eq!(used.rejected.len(), 1, "{used:?}");
    assert_eq!(used.rejected[0].kind, Rejection::Stale);
    assert!(used.rejected[0].why.contains("modified"), "{used:?}");
    assert_eq!((used.read, used.read_from.clone()), (0, None));
    assert_eq!(used.written, Written::To(f.beside().to_path_buf()));
    assert_same(&got, &f.fresh(all), "after a touch");
    assert!(f.load(all).1.is_hit(), "rebuilt for the new mtime");

    // A weight file grown by a byte: its size differs (the mapping stays valid).
    std::fs::OpenOptions::new()
        .append(true)
        .open(&shard)
        .unwrap()
        .write_all(&[0])
        .unwrap();
    let (_, used) = f.load(all);
    assert_eq!(used.rejected[0].kind, Rejection::Stale, "{used:?}");
    assert!(used.rejected[0].why.contains("bytes"), "{used:?}");
    assert!(f.load(all).1.is_hit());

    // Another format version.
    let mut file = std::fs::read(f.beside()).unwrap();
    file[8..12].copy_from_slice(&999u32.to_le_bytes());
    std::fs::write(f.beside(), &file).unwrap();
    let (got, used) = f.load(all);
    assert_eq!(used.rejected[0].kind, Rejection::Stale, "{used:?}");
    assert!(used.rejected[0].why.contains("version 999"), "{used:?}");
    assert_same(&got, &f.fresh(all), "after another version");
    assert!(f.load(all).1.is_hit());
}

/// The header's index offset and length.
fn index_of(file: &[u8]) -> (usize, usize) {
    let word = |at: usize| u64::from_le_bytes(file[at..at + 8].try_into().unwrap()) as usize;
    (word(16), word(24))
}

/// `file` with its index edited by `edit` (the JSON), its checksum made to match.
fn with_index(file: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let (at, len) = index_of(file);
    let mut index: serde_json::Value = serde_json::from_slice(&file[at..at + len]).unwrap();
    edit(&mut index);
    let text = serde_json::to_vec(&index).unwrap();
    let mut out = file[..at].to_vec();
    out[24..32].copy_from_slice(&(text.len() as u64).to_le_bytes());
    out[32..40].copy_from_slice(&checksum(&text).to_le_bytes());
    out.extend_from_slice(&text);
    out
}

#[test]
fn a_corrupt_cache_is_detected_reported_and_rebuilt() {
    let f = Fixture::new();
    let fresh = f.fresh(all);
    f.load(all);
    let good = std::fs::read(f.beside()).unwrap();
    let (index_at, _) = index_of(&good);

    let mut flipped = good.clone();
    // A byte inside the first entry's sign-mantissa bytes (after its table and lane starts).
    flipped[ENTRY_ALIGN + 20_000] ^= 0x10;
    let mut garbage = good.clone();
    garbage[..64].copy_from_slice(&[0x5a; 64]);
    let mut bad_index = good.clone();
    bad_index[index_at + 10] ^= 1;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a flipped byte", flipped, "checksum"),
        (
            "a truncated file",
            good[..good.len() / 2].to_vec(),
            "truncated",
        ),
        ("a truncated header", good[..30].to_vec(), "header"),
        ("a garbage header", garbage, "magic"),
        (
            "an index that does not match its checksum",
            bad_index,
            "index",
        ),
        (
            "an entry longer than its layout",
            with_index(&good, |i| {
                let t = i["tensors"].as_array_mut().unwrap();
                let e = t.iter_mut().find(|e| !e["encoded"].is_null()).unwrap();
                let len = e["encoded"]["len"].as_u64().unwrap();
                e["encoded"]["len"] = (len + 4).into();
            }),
            "layout",
        ),
        (
            "two entries at one place",
            with_index(&good, |i| {
                let t = i["tensors"].as_array_mut().unwrap();
                let mut encoded = t.iter_mut().filter(|e| !e["encoded"].is_null());
                let at = encoded.next().unwrap()["encoded"]["at"].clone();
                encoded.next().unwrap()["encoded"]["at"] = at;
            }),
            "overlap",
        ),
        (
            "an entry past the end",
            with_index(&good, |i| {
                let t = i["tensors"].as_array_mut().unwrap();
                let e = t.iter_mut().find(|e| !e["encoded"].is_null()).unwrap();
                e["encoded"]["at"] = (1u64 << 40).into();
            }),
            "outside",
        ),
        (
            "a count that is not its shape's",
            with_index(&good, |i| {
                i["tensors"][0]["numel"] = 7.into();
            }),
            "shape",
        ),
        (
            "an index that is not JSON",
            with_index(&good, |i| *i = serde_json::Value::String("[".into())),
            "parse",
        ),
    ];
    for (what, bytes, why) in cases {
        std::fs::write(f.beside(), &bytes).unwrap();
        let (got, used) = f.load(all);
        assert_eq!(used.rejected.len(), 1, "{what}: {used:?}");
        let r = &used.rejected[0];
        assert_eq!(r.kind, Rejection::Corrupt, "{what}: {r:?}");
        assert_eq!(r.path, f.beside(), "{what}");
        assert!(
            r.why.contains(why),
            "{what}: {:?} does not say {why:?}",
            r.why
        );
        let line = &used.messages()[0];
        assert!(
            line.contains("corrupt") && line.contains(&f.beside().display().to_string()),
            "{what}: {line}"
        );
        assert_eq!((used.read, used.encoded), (0, fresh.len()), "{what}");
        assert_eq!(
            used.written,
            Written::To(f.beside().to_path_buf()),
            "{what}"
        );
        assert_same(&got, &fresh, what);
        let (again, used) = f.load(all);
        assert!(used.is_hit(), "{what}: rebuilt: {used:?}");
        assert_same(&again, &fresh, what);
    }
}

#[test]
fn a_model_folder_that_cannot_be_written_falls_back_to_the_users_cache() {
    let f = Fixture::new();
    // A file where the cache's folder would be: no one can make it, root included.
    std::fs::write(f.model_dir.join(".ferry-encodings"), b"in the way").unwrap();
    assert_written_then_hit(&f, &f.places[1], "blocked");
    std::fs::remove_file(f.model_dir.join(".ferry-encodings")).unwrap();

    // Nowhere to write: encoded at every load, said so, the encodings the same.
    let nowhere = Fixture::new();
    std::fs::write(nowhere.model_dir.join(".ferry-encodings"), b"").unwrap();
    std::fs::write(nowhere.places[1].parent().unwrap().parent().unwrap(), b"").unwrap();
    let (got, used) = nowhere.load(all);
    assert!(matches!(used.written, Written::Nowhere(_)), "{used:?}");
    assert!(used.messages()[0].contains("not cached"), "{used:?}");
    assert_same(&got, &nowhere.fresh(all), "uncached");

    // A read-only model folder, where permissions bind (not for root).
    let ro = Fixture::new();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro.model_dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = ro.model_dir.join("probe");
    if std::fs::write(&probe, b"").is_ok() {
        std::fs::remove_file(&probe).unwrap();
        eprintln!("read-only folder: permissions do not bind for this user; checked the blocked folder only");
    } else {
        assert_written_then_hit(&ro, &ro.places[1], "read-only");
    }
    std::fs::set_permissions(&ro.model_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn more_groups_streaming_encode_only_what_is_missing_and_keep_the_union() {
    let f = Fixture::new();
    let groups = f.arch.groups().len();
    let half = |g: usize| g < groups / 2;
    let (_, first) = f.load(half);
    let some = first.encoded;
    assert!(some > 0 && first.written == Written::To(f.beside().to_path_buf()));

    let (got, used) = f.load(all);
    assert_eq!(used.read_from.as_deref(), Some(f.beside()));
    assert_eq!(used.read, some, "{used:?}");
    assert!(used.encoded > 0, "{used:?}");
    assert_eq!(used.written, Written::To(f.beside().to_path_buf()));
    assert_same(&got, &f.fresh(all), "grown");

    // Both budgets now hit the one file.
    for (what, keep) in [("all", &all as &dyn Fn(usize) -> bool), ("half", &half)] {
        let (got, used) = f.load(keep);
        assert!(used.is_hit(), "{what}: {used:?}");
        assert_same(&got, &f.fresh(keep), what);
    }
}

#[test]
fn streaming_from_cached_encodings_on_the_cpu_equals_resident_bit_for_bit() {
    use ferry::backend::cpu::Cpu;
    use ferry::backend::cpu_stream::{cpu_streamed_weights, HostStorage};
    use ferry::backend::Backend;
    use ferry::model::{PassShape, ResidentWeights};
    use ferry::stream::budget::{BudgetAllocator, Purpose};
    use ferry::stream::{plan, PlanRequest};

    let f = Fixture::new();
    f.load(all);
    let mut compressed = f.compressed();
    let jobs = f.jobs(&compressed, all);
    let (encodings, used) = f.cache().encodings(&jobs).unwrap();
    assert!(used.is_hit(), "{used:?}");
    compressed.put_exponents(&jobs, encodings);
    let compressed = Arc::new(compressed);

    let vocab = f.ckpt.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..7).map(|i| (i * 131 + 3) % vocab).collect();
    let steps = 2;
    let mut resident = ResidentWeights::load(&f.ckpt, f.arch.groups(), |t| Cpu.weight(t)).unwrap();
    let want = common::passes_of(&f.arch, &mut resident, &prompt, steps);
    let shape = PassShape {
        tokens: prompt.len(),
        batch: 1,
        past: 0,
    };
    let request = |budget| PlanRequest {
        compressed: Some(compressed.clone()),
        ..common::cpu_request(&f.arch, &f.ckpt, shape, budget)
    };
    let cost = f.arch.pass_cost(shape);
    let p = plan(&common::least_budget(&request(cost.cache + cost.workspace))).unwrap();
    assert!(p.compressed(), "something streams compressed");
    let alloc = BudgetAllocator::new(HostStorage, p.budget);
    let _kv = alloc.alloc(Purpose::KvCache, p.kv_cache).unwrap();
    let _ws = alloc.alloc(Purpose::Workspace, p.workspace).unwrap();
    let (mut weights, _residents) =
        cpu_streamed_weights(&f.tensors, p, &alloc, Some(compressed.clone()), None).unwrap();
    let got = common::passes_of(&f.arch, &mut weights, &prompt, steps);
    assert!(
        got == want,
        "streamed from cached encodings: the logits differ"
    );
}

#[test]
fn the_flag_is_in_the_help() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--encoding-cache"), "{help}");
    assert!(help.contains(".ferry-encodings"), "{help}");
}

/// A temporary file that a ferry killed while writing the cache left behind (its process is
/// gone) is removed at the next write; one of a process that still runs is not.
#[cfg(target_os = "linux")]
#[test]
fn a_killed_writers_temporary_file_is_removed_at_the_next_write() {
    let f = Fixture::new();
    let folder = f.beside().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&folder).unwrap();
    let name = f
        .beside()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    // A process id above the kernel's limit (4194304) never runs.
    let orphan = folder.join(format!(".{name}.tmp4194305"));
    let live = folder.join(format!(".{name}.tmp1"));
    let other = folder.join("notes.txt");
    for p in [&orphan, &live, &other] {
        std::fs::write(p, b"x").unwrap();
    }
    let (_, used) = f.load(all);
    assert_eq!(used.written, Written::To(f.beside().to_path_buf()));
    assert!(!orphan.exists(), "the orphan is removed");
    assert!(live.exists(), "pid 1 runs: its file is left");
    assert!(other.exists(), "other files are left");
}

/// A load that misses encodes, beside its own tensors, those that would stream at other
/// budgets (`encodings_ahead`), in the same write: the next load streaming them reads the
/// file, nothing is encoded or written again, and only the load's own encodings come back.
#[test]
fn a_miss_writes_ahead_what_other_budgets_stream_in_one_write() {
    let f = Fixture::new();
    let groups = f.arch.groups().len();
    let half = |g: usize| g < groups / 2;
    let rest = |g: usize| g >= groups / 2;
    let c = f.compressed();
    let jobs = f.jobs(&c, half);
    let ahead = f.jobs(&c, rest);
    assert!(!jobs.is_empty() && !ahead.is_empty());
    let (got, used) = f.cache().encodings_ahead(&jobs, &ahead).unwrap();
    assert_eq!(got.len(), jobs.len(), "only the load's own encodings");
    assert_same(&got, &f.fresh(half), "the load's");
    assert_eq!(
        (used.encoded, used.encoded_ahead),
        (jobs.len(), ahead.len())
    );
    assert_eq!(used.written, Written::To(f.beside().to_path_buf()));
    let line = used.messages().join(" ");
    assert!(
        line.contains(&format!("and {} more for later loads", ahead.len())),
        "{line}"
    );

    // The other budget's tensors now come from the file: a pure hit, the same bytes.
    let (got, used) = f.load(rest);
    assert!(used.is_hit(), "{used:?}");
    assert_same(&got, &f.fresh(rest), "written ahead");
    // A hit encodes nothing ahead either.
    let c = f.compressed();
    let (_, used) = f
        .cache()
        .encodings_ahead(&f.jobs(&c, half), &f.jobs(&c, rest))
        .unwrap();
    assert!(used.is_hit() && used.encoded_ahead == 0, "{used:?}");
}
