//! The direction of dependencies between ferry's modules, read from the `crate::…` paths in
//! src/: the engine (`stream`) knows architectures only by their description and no CUDA
//! internals; models know neither the engine nor CUDA; checkpoints and backends know no
//! model.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The `crate::…` paths a file names (in `use` lines and inline), as written.
fn crate_paths(text: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let tail = &rest[i + "crate::".len()..];
            let end = tail
                .find(|c: char| {
                    !(c.is_alphanumeric()
                        || c == '_'
                        || c == ':'
                        || c == '{'
                        || c == ','
                        || c == ' ')
                })
                .unwrap_or(tail.len());
            paths.push(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    paths
}

/// (file, path) pairs under `module` whose path contains any of `forbidden`.
fn violations(module: &str, forbidden: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(module);
    let mut found = Vec::new();
    for file in sources(&root) {
        let text = std::fs::read_to_string(&file).expect("source is UTF-8");
        for path in crate_paths(&text) {
            if forbidden.iter().any(|f| path.contains(f)) {
                let rel = file
                    .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                    .unwrap_or(&file);
                found.push(format!("{}: crate::{path}", rel.display()));
            }
        }
    }
    found
}

#[test]
fn the_engine_knows_architectures_only_by_their_description() {
    let v = violations(
        "stream",
        &[
            "backend::cuda",
            "Llama",
            "llama",
            "commands",
            "generate",
            "runtime",
        ],
    );
    assert!(
        v.is_empty(),
        "stream/ reaches past the model socket: {v:#?}"
    );
}

#[test]
fn models_know_neither_the_engine_nor_cuda() {
    let v = violations("model", &["stream", "backend::cuda", "commands", "runtime"]);
    assert!(
        v.is_empty(),
        "model/ reaches into the engine or CUDA: {v:#?}"
    );
}

#[test]
fn checkpoints_know_no_model() {
    let v = violations("checkpoint", &["model", "stream", "backend", "runtime"]);
    assert!(
        v.is_empty(),
        "checkpoint/ reaches into models or above: {v:#?}"
    );
}

#[test]
fn backends_know_no_model() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend");
    // The engines stream a model's groups as the engine resolved them (GroupTensors), not
    // the architecture.
    for file in sources(&root) {
        let text = std::fs::read_to_string(&file).expect("source is UTF-8");
        for path in crate_paths(&text) {
            assert!(
                !path.starts_with("model") && !path.starts_with("commands"),
                "{}: crate::{path}",
                file.display()
            );
        }
    }
}

#[test]
fn the_engine_holds_no_unsafe_code() {
    // Raw addresses and `unsafe` stay with the backends (the CUDA host tier hands the staging
    // ring its bytes through `HostBytes`); only a test's fake DMA engine may read raw memory.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/stream");
    for file in sources(&root) {
        let text = std::fs::read_to_string(&file).expect("source is UTF-8");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (i, line) in code.lines().enumerate() {
            let line = line.trim();
            assert!(
                line.starts_with("//") || !line.contains("unsafe"),
                "{}:{}: {line}",
                file.display(),
                i + 1
            );
        }
    }
}

#[test]
fn commands_hold_no_set_up() {
    // Device, budget, host tier, plan and streamed weights are set up by the front door
    // (runtime.rs), one way for every command.
    let set_up = [
        "Cuda::new",
        "Cuda::with_vram",
        "HostTier::new",
        "measure_h2d",
        "PlanRequest {",
        "StreamedWeights::new",
        "stream::plan(",
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/commands");
    for file in sources(&root) {
        let text = std::fs::read_to_string(&file).expect("source is UTF-8");
        for s in set_up {
            assert!(
                !text.contains(s),
                "{} sets up by hand ({s}); use ferry::runtime",
                file.display()
            );
        }
    }
}
