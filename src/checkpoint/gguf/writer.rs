//! Writing GGUF v3 files, little-endian, exactly what [`parse_header`](super::parse_header)
//! reads: magic, version, counts, metadata, tensor infos (dims innermost first, ggml type id,
//! offset into the data section), padding to [`ALIGNMENT`], then the data of each tensor, in
//! the order of the infos, each padded to [`ALIGNMENT`].
//!
//! The data is streamed: [`GgufWriter::new`] writes the header, and the caller passes each
//! tensor's bytes in order, in as many pieces as it likes ([`GgufWriter::write`]).

use std::io::Write;

use super::header::MAGIC;
use super::{GgmlType, Value};

/// Alignment of the data section and of every tensor in it (bytes), written as
/// `general.alignment`.
pub const ALIGNMENT: usize = 32;

/// One tensor as the file will describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDesc {
    pub name: String,
    /// Row-major shape, outermost first (`[out_features, in_features]`); written reversed.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorDesc {
    /// Bytes of data: whole blocks of `ty` along the rows (the innermost dimension).
    pub fn bytes(&self) -> usize {
        let numel: usize = self.shape.iter().product();
        numel / self.ty.block_size() * self.ty.type_size()
    }
}

/// What is wrong with a tensor the caller asked to write (a bug in the caller, but one that
/// must not become a file that no reader opens).
fn check(t: &TensorDesc) -> std::io::Result<()> {
    let row = t.shape.last().copied().unwrap_or(1);
    if t.shape.len() > 4 || row % t.ty.block_size() != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "GGUF tensor {:?}: shape {:?} cannot be stored as {} (at most 4 dimensions, rows a multiple of {})",
                t.name,
                t.shape,
                t.ty,
                t.ty.block_size()
            ),
        ));
    }
    Ok(())
}

/// A GGUF file being written: the header is out, the tensors' data follows in order.
pub struct GgufWriter<W: Write> {
    out: W,
    tensors: Vec<TensorDesc>,
    /// The tensor whose data is being written, and its bytes so far.
    current: usize,
    written: usize,
}

impl<W: Write> GgufWriter<W> {
    /// Write the header: `metadata` in the order given (after `general.alignment`, which the
    /// writer adds), then the infos of `tensors` with their offsets.
    pub fn new(
        mut out: W,
        metadata: &[(String, Value)],
        tensors: Vec<TensorDesc>,
    ) -> std::io::Result<Self> {
        for t in &tensors {
            check(t)?;
        }
        let mut h = Vec::new();
        h.extend_from_slice(MAGIC);
        h.extend(3u32.to_le_bytes());
        h.extend((tensors.len() as u64).to_le_bytes());
        h.extend((metadata.len() as u64 + 1).to_le_bytes());
        put_string(&mut h, "general.alignment");
        put_value(&mut h, &Value::U32(ALIGNMENT as u32));
        for (key, value) in metadata {
            put_string(&mut h, key);
            put_value(&mut h, value);
        }
        let mut offset = 0usize;
        for t in &tensors {
            put_string(&mut h, &t.name);
            h.extend((t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                h.extend((d as u64).to_le_bytes());
            }
            h.extend(t.ty.id().to_le_bytes());
            h.extend((offset as u64).to_le_bytes());
            offset = (offset + t.bytes()).next_multiple_of(ALIGNMENT);
        }
        h.resize(h.len().next_multiple_of(ALIGNMENT), 0);
        out.write_all(&h)?;
        let mut w = GgufWriter {
            out,
            tensors,
            current: 0,
            written: 0,
        };
        w.skip_empty();
        Ok(w)
    }

    /// Size of the data section of a file of `tensors`, padding included (bytes).
    pub fn data_bytes(tensors: &[TensorDesc]) -> usize {
        tensors
            .iter()
            .map(|t| t.bytes().next_multiple_of(ALIGNMENT))
            .sum()
    }

    /// The tensor whose bytes [`write`](Self::write) expects next, or None when all are written.
    pub fn next_tensor(&self) -> Option<&TensorDesc> {
        self.tensors.get(self.current)
    }

    /// Append `bytes` to the current tensor's data; a tensor completed is padded and the next
    /// one begins. Panics if `bytes` runs past the current tensor (a bug in the caller).
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let t = self
            .tensors
            .get(self.current)
            .expect("GGUF writer: data after the last tensor");
        let len = t.bytes();
        assert!(
            self.written + bytes.len() <= len,
            "GGUF writer: {} bytes for tensor {:?} of {len}",
            self.written + bytes.len(),
            t.name
        );
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        if self.written == len {
            self.pad(len)?;
            self.current += 1;
            self.written = 0;
            self.skip_empty();
        }
        Ok(())
    }

    /// Finish the file and hand back the output (flushed). Panics if a tensor's data is
    /// missing (a bug in the caller).
    pub fn finish(mut self) -> std::io::Result<W> {
        if let Some(t) = self.tensors.get(self.current) {
            panic!(
                "GGUF writer: finished with tensor {:?} at {} of {} bytes",
                t.name,
                self.written,
                t.bytes()
            );
        }
        self.out.flush()?;
        Ok(self.out)
    }

    fn pad(&mut self, len: usize) -> std::io::Result<()> {
        let zeros = [0u8; ALIGNMENT];
        self.out
            .write_all(&zeros[..len.next_multiple_of(ALIGNMENT) - len])
    }

    /// Tensors with no elements have no data to wait for.
    fn skip_empty(&mut self) {
        while self
            .tensors
            .get(self.current)
            .is_some_and(|t| t.bytes() == 0)
        {
            self.current += 1;
        }
    }
}

fn put_string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// GGUF's value type ids.
fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    b.extend(type_id(v).to_le_bytes());
    put_payload(b, v);
}

fn put_payload(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.push(*x as u8),
        Value::U16(x) => b.extend(x.to_le_bytes()),
        Value::I16(x) => b.extend(x.to_le_bytes()),
        Value::U32(x) => b.extend(x.to_le_bytes()),
        Value::I32(x) => b.extend(x.to_le_bytes()),
        Value::U64(x) => b.extend(x.to_le_bytes()),
        Value::I64(x) => b.extend(x.to_le_bytes()),
        Value::F32(x) => b.extend(x.to_le_bytes()),
        Value::F64(x) => b.extend(x.to_le_bytes()),
        Value::Bool(x) => b.push(u8::from(*x)),
        Value::String(s) => put_string(b, s),
        Value::Array(items) => {
            // An array has one element type; an empty one is written as an array of strings.
            let elem = items.first().map_or(8, type_id);
            assert!(
                items.iter().all(|i| type_id(i) == elem),
                "GGUF writer: an array mixes element types"
            );
            b.extend(elem.to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_payload(b, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse_header, read_f32};
    use super::*;
    use crate::checkpoint::quant::{dequantize, quantize};

    #[test]
    fn written_file_parses_back() {
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("llama.block_count".to_string(), Value::U32(2)),
            ("llama.rope.freq_base".to_string(), Value::F32(10000.0)),
            ("x.f64".to_string(), Value::F64(-0.5)),
            ("x.i64".to_string(), Value::I64(-3)),
            ("x.flag".to_string(), Value::Bool(true)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(vec![Value::String("a".into()), Value::String("é".into())]),
            ),
            (
                "x.nested".to_string(),
                Value::Array(vec![Value::Array(vec![Value::I32(1), Value::I32(-2)])]),
            ),
            ("x.empty".to_string(), Value::Array(vec![])),
        ];
        let norm: Vec<f32> = (0..48).map(|i| i as f32 / 7.0).collect();
        let weight: Vec<f32> = (0..3 * 256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let tensors = vec![
            TensorDesc {
                name: "norm".into(),
                shape: vec![48],
                ty: GgmlType::F32,
            },
            TensorDesc {
                name: "empty".into(),
                shape: vec![0, 32],
                ty: GgmlType::Q8_0,
            },
            TensorDesc {
                name: "w".into(),
                shape: vec![3, 256],
                ty: GgmlType::Q4_K,
            },
        ];
        let mut w = GgufWriter::new(Vec::new(), &metadata, tensors.clone()).unwrap();
        assert_eq!(w.next_tensor().unwrap().name, "norm");
        w.write(&quantize(GgmlType::F32, &norm[..10])).unwrap();
        w.write(&quantize(GgmlType::F32, &norm[10..])).unwrap();
        assert_eq!(
            w.next_tensor().unwrap().name,
            "w",
            "an empty tensor has no data"
        );
        let blocks = quantize(GgmlType::Q4_K, &weight);
        w.write(&blocks).unwrap();
        assert!(w.next_tensor().is_none());
        let bytes = w.finish().unwrap();

        let h = parse_header(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.alignment, ALIGNMENT);
        assert_eq!(h.metadata["general.alignment"], Value::U32(32));
        for (k, v) in &metadata {
            assert_eq!(&h.metadata[k], v, "{k}");
        }
        assert_eq!(h.metadata.len(), metadata.len() + 1);
        let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["norm", "empty", "w"]);
        assert_eq!(h.tensors[2].dims, [256, 3], "innermost first");
        assert_eq!(h.tensors[2].shape(), [3, 256]);
        assert_eq!(h.tensors[2].ty, GgmlType::Q4_K);
        for t in &h.tensors {
            assert_eq!((t.start - h.data_offset) % ALIGNMENT, 0, "{}", t.name);
        }
        assert_eq!(read_f32(&h.tensors[0], &bytes), norm);
        let t = &h.tensors[2];
        assert_eq!(&bytes[t.start..t.start + t.len], &blocks[..]);
        let mut back = vec![0f32; weight.len()];
        dequantize(t.ty, &bytes[t.start..t.start + t.len], &mut back);
        assert!(back.iter().zip(&weight).all(|(a, b)| (a - b).abs() < 0.1));
        let data = GgufWriter::<Vec<u8>>::data_bytes(&tensors);
        assert_eq!(h.data_offset + data, bytes.len());
    }

    #[test]
    fn a_shape_its_type_cannot_store_is_refused() {
        let t = TensorDesc {
            name: "w".into(),
            shape: vec![2, 100],
            ty: GgmlType::Q4_K,
        };
        let e = GgufWriter::new(Vec::new(), &[], vec![t]).err().unwrap();
        assert!(e.to_string().contains("rows a multiple of 256"), "{e}");
    }
}
