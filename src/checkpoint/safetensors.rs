//! The safetensors format: an 8-byte little-endian header length, a JSON header mapping
//! tensor names to dtype, shape and byte range, then the data. Parsed here without copying.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::{DType, HostTensor, Storage};
use crate::error::{Error, Result};

#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Map `path` and return views of every tensor in it.
pub fn read(path: &Path) -> Result<Vec<HostTensor>> {
    let storage = Arc::new(Storage::map(path)?);
    let bytes = storage.bytes();
    let bad = |message: String| Error::checkpoint(path, message);

    if bytes.len() < 8 {
        return Err(bad(format!(
            "file is {} bytes, too short for a safetensors header (8-byte length + JSON)",
            bytes.len()
        )));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            bad(format!(
                "header length {header_len} exceeds the file size {} (truncated or not safetensors)",
                bytes.len()
            ))
        })?;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: format!("safetensors header: {e}"),
        })?;

    let data_len = bytes.len() - data_start;
    let mut tensors = Vec::with_capacity(header.len());
    // Each tensor's data bytes, to refuse two tensors that share bytes (as GGUF does).
    let mut ranges: Vec<(usize, usize, String)> = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let entry: Entry = serde_json::from_value(value).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: format!("safetensors header entry {name:?}: {e}"),
        })?;
        let dtype = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            // The position-index buffers older transformers saved beside the weights (CLIP's
            // `text_model.embeddings.position_ids`, in some clip_l.safetensors): no model reads
            // them.
            "I64" | "I32" if name.ends_with("position_ids") => continue,
            other => {
                return Err(Error::DType {
                    tensor: name,
                    found: other.to_string(),
                    expected: "F32, F16 or BF16",
                })
            }
        };
        let (begin, end) = entry.data_offsets;
        let numel = entry
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                bad(format!(
                    "tensor {name:?}: shape {:?} overflows",
                    entry.shape
                ))
            })?;
        let expected_len = numel * dtype.size();
        if begin > end || end - begin != expected_len {
            return Err(bad(format!(
                "tensor {name:?}: byte range {begin}..{end} does not hold {:?} {} ({expected_len} bytes)",
                entry.shape, dtype
            )));
        }
        if end > data_len {
            return Err(bad(format!(
                "tensor {name:?} ends at data byte {end}, but the file holds only {data_len} data bytes (truncated?)"
            )));
        }
        if begin < end {
            ranges.push((begin, end, name.clone()));
        }
        tensors.push(HostTensor::new(
            name,
            dtype,
            entry.shape,
            storage.clone(),
            data_start + begin,
            expected_len,
        ));
    }
    ranges.sort();
    for pair in ranges.windows(2) {
        let ((a0, a1, a), (b0, b1, b)) = (&pair[0], &pair[1]);
        if b0 < a1 {
            return Err(bad(format!(
                "tensors {a:?} (data bytes {a0}..{a1}) and {b:?} ({b0}..{b1}) overlap; each tensor needs bytes of its own"
            )));
        }
    }
    Ok(tensors)
}

/// Write tensors as a safetensors file (f32/f16/bf16 little-endian data). Used by `ferry synth`
/// and by tests that make broken checkpoints.
pub fn write(path: &Path, tensors: &[(String, DType, Vec<usize>, Vec<u8>)]) -> Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, data) in tensors {
        let dtype = match dtype {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Ggml(t) => {
                return Err(Error::checkpoint(
                    path,
                    format!("{name}: safetensors holds no {t} blocks"),
                ))
            }
        };
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let mut json = serde_json::to_vec(&header).expect("a JSON map serializes");
    // Pad the header so the data starts 8-byte aligned.
    while (8 + json.len()) % 8 != 0 {
        json.push(b' ');
    }
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| Error::io(path, e))?);
    let mut put = |b: &[u8]| file.write_all(b).map_err(|e| Error::io(path, e));
    put(&(json.len() as u64).to_le_bytes())?;
    put(&json)?;
    for (_, _, _, data) in tensors {
        put(data)?;
    }
    file.flush().map_err(|e| Error::io(path, e))
}

/// Every tensor of `path` by name.
pub fn read_map(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    Ok(read(path)?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect())
}

/// What comes before `anchor` in the shortest tensor name of `tensors` that ends with it
/// (`""`, or a wrapper's prefix such as `model.diffusion_model.`), or None when no name does.
pub fn prefix_before<T>(tensors: &BTreeMap<String, T>, anchor: &str) -> Option<String> {
    tensors
        .keys()
        .filter_map(|k| k.strip_suffix(anchor))
        .min_by_key(|p| p.len())
        .map(str::to_string)
}

/// The shape of every tensor by name: what a single file's config is inferred from.
pub fn shapes(tensors: &BTreeMap<String, HostTensor>) -> BTreeMap<String, Vec<usize>> {
    tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with an integer `position_ids` buffer beside its weights opens without it; an
    /// integer weight is still refused, naming it.
    #[test]
    fn integer_position_ids_are_skipped_and_integer_weights_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip_l.safetensors");
        let ids: Vec<u8> = (0..4i64).flat_map(|i| i.to_le_bytes()).collect();
        let header = serde_json::json!({
            "text_model.embeddings.position_ids": {"dtype": "I64", "shape": [1, 4], "data_offsets": [0, 32]},
            "w": {"dtype": "F32", "shape": [2], "data_offsets": [32, 40]},
        });
        let write = |header: &serde_json::Value| {
            let text = serde_json::to_vec(header).unwrap();
            let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(&text);
            bytes.extend_from_slice(&ids);
            bytes.extend_from_slice(&[0u8; 8]);
            std::fs::write(&path, bytes).unwrap();
        };
        write(&header);
        let names: Vec<String> = read(&path).unwrap().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["w"]);
        let mut bad = header.clone();
        bad["w"]["dtype"] = serde_json::json!("I32");
        bad["w"]["shape"] = serde_json::json!([2]);
        write(&bad);
        let err = read(&path).err().unwrap().to_string();
        assert!(
            err.contains("I32") && err.contains("F32, F16 or BF16"),
            "{err}"
        );
    }
}
