//! Random weights for any architecture's groups, made in host memory: a [`Component`] for
//! benchmarks of models that are not on disk (a diffusion transformer of a real shape).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use super::random::{is_norm_scale, tensor_key, Table};
use crate::checkpoint::{Component, DType, HostTensor, Storage};
use crate::model::WeightGroup;

/// Every tensor of `groups`, bf16, drawn as `ferry synth` draws them (N(1, 0.02²) for norm
/// scales, N(0, 0.02²) for the rest, a pure function of `seed` and the name), in one owned
/// buffer. `config` is the component's config.json as parsed.
pub fn random_component(
    name: &str,
    class_name: &str,
    config: Value,
    groups: &[WeightGroup],
    seed: u64,
) -> Component {
    let (small, near_one) = (Table::normal(0.0, 0.02), Table::normal(1.0, 0.02));
    let specs: Vec<_> = groups.iter().flat_map(|g| &g.tensors).collect();
    // Each tensor starts at a multiple of 8 bytes (the buffer's words).
    let sizes: Vec<usize> = specs
        .iter()
        .map(|s| (s.numel() * 2).next_multiple_of(8))
        .collect();
    let mut storage = Storage::owned(sizes.iter().sum());
    {
        let bytes = storage.bytes_mut().expect("an owned buffer");
        let mut offset = 0;
        for (s, &size) in specs.iter().zip(&sizes) {
            // Norm scales near one, as `ferry synth` draws them.
            let table = match is_norm_scale(&s.name, &s.shape) {
                true => &near_one,
                false => &small,
            };
            let out = &mut bytes[offset..offset + s.numel() * 2];
            table.fill(DType::BF16, tensor_key(seed, &s.name), 0, out);
            offset += size;
        }
    }
    let storage = Arc::new(storage);
    let mut tensors = BTreeMap::new();
    let mut offset = 0;
    for (s, &size) in specs.iter().zip(&sizes) {
        let len = s.numel() * 2;
        let t = HostTensor::new(
            s.name.clone(),
            DType::BF16,
            s.shape.clone(),
            storage.clone(),
            offset,
            len,
        );
        tensors.insert(s.name.clone(), t);
        offset += size;
    }
    let dir = PathBuf::from(format!("synthetic:{name}"));
    Component {
        name: name.to_string(),
        class_name: Some(class_name.to_string()),
        config: Some((dir.join("config.json"), config)),
        dir,
        tensors,
        file_bytes: 0, // made in memory
        files: Vec::new(),
    }
}
