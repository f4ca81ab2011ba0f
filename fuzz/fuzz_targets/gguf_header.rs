//! GGUF header and metadata parsing, then the whole in-memory load (metadata → config,
//! tensor mapping, dequantization): any input must give `Ok` or an `Err`, never a panic,
//! and an accepted header must only point inside the input.

#![no_main]

use std::path::Path;

use ferry::checkpoint::gguf;
use ferry::checkpoint::DType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = gguf::parse_header(data) {
        assert!(matches!(header.version, 2 | 3));
        assert!(header.alignment.is_power_of_two());
        for t in &header.tensors {
            assert!(t.start >= header.data_offset);
            assert!(
                t.start + t.len <= data.len(),
                "tensor {} outside the input",
                t.name
            );
        }
        let _ = gguf::from_bytes(Path::new("fuzz.gguf"), data, DType::F32);
    }
});
