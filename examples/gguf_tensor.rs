//! Write one tensor of a GGUF file as ferry dequantizes it: little-endian f32, in the file's
//! own element order (llama.cpp's permuted Q/K rows left as stored), for comparing with other
//! readers (scripts/check_gguf_with_gguf_py.py).
//!
//! Usage: cargo run --release --example gguf_tensor -- FILE.gguf TENSOR OUT.f32

use ferry::checkpoint::gguf::{parse_header, read_f32};
use ferry::checkpoint::Storage;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, file, tensor, out] = &args[..] else {
        return Err("usage: gguf_tensor FILE.gguf TENSOR OUT.f32".into());
    };
    let map = Storage::map(Path::new(file))?;
    let header = parse_header(map.bytes())?;
    let info = header
        .tensors
        .iter()
        .find(|t| t.name == *tensor)
        .ok_or_else(|| format!("{file}: no tensor {tensor:?}"))?;
    let values = read_f32(info, map.bytes());
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out, bytes)?;
    eprintln!(
        "{tensor}: {} {:?}, {} values",
        info.ty,
        info.shape(),
        values.len()
    );
    Ok(())
}
