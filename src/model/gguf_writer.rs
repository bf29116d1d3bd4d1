//! GGUF v3 writer: metadata, tensor infos and tensor data in the layout llama.cpp's
//! `gguf_init_from_file` reads (and [`super::gguf::GgufFile`] reads back), for `backflow export
//! --format gguf`.
//!
//! The header is written first from a plan of every tensor (name, shape, type), so the data can
//! then be streamed one tensor at a time: an exporter never holds more than one tensor of the
//! model in memory, whatever the model's size.
//!
//! Tensor types written: `F32`, `F16` and `Q8_0` (ggml's `block_q8_0`: an `f16` scale and 32
//! signed bytes, `d = max|v| / 127`, as `quantize_row_q8_0_ref`).

use std::io::{self, Write};

use half::f16;

use super::gguf::{GgmlType, GgufValue};
use super::quant::{quantize_block, QK};

/// The four bytes every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";
/// The version written.
const VERSION: u32 = 3;
/// Alignment of the data section and of every tensor in it (ggml's default).
pub const ALIGNMENT: u64 = 32;

/// One tensor to write: its name, its shape (row-major, outermost first: `[rows, cols]`, as
/// [`super::gguf::GgufTensorInfo::shape`] gives it back) and its type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// `F32`, `F16` or `Q8_0`.
    pub ty: GgmlType,
}

impl TensorPlan {
    /// Elements of the tensor.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of its data, unpadded.
    pub fn data_bytes(&self) -> usize {
        match self.ty {
            GgmlType::Q8_0 => self.elements() / QK * (2 + QK),
            GgmlType::F16 => self.elements() * 2,
            _ => self.elements() * 4,
        }
    }
}

/// The type a tensor of `shape` gets when `wanted` is asked for: 1-D tensors (norms, biases)
/// stay `F32`, as llama.cpp's converter keeps them; `Q8_0` needs rows that split into blocks of
/// 32 and falls back to `F16` otherwise (the converter's fallback too).
pub fn type_for(shape: &[usize], wanted: GgmlType) -> GgmlType {
    if shape.len() < 2 {
        return GgmlType::F32;
    }
    match wanted {
        GgmlType::Q8_0 if !shape[shape.len() - 1].is_multiple_of(QK) => GgmlType::F16,
        other => other,
    }
}

/// Writes `values` (row-major) as tensor data of type `ty` (`F32`, `F16` or `Q8_0`; for `Q8_0`
/// `values.len()` must be a multiple of 32, which [`type_for`] guarantees for whole rows).
pub fn encode(ty: GgmlType, values: &[f32], out: &mut Vec<u8>) {
    match ty {
        GgmlType::Q8_0 => {
            let mut q = [0i8; QK];
            for block in values.chunks_exact(QK) {
                let d = quantize_block(block, &mut q);
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(q.iter().map(|&v| v as u8));
            }
        }
        GgmlType::F16 => {
            out.extend(values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()));
        }
        _ => out.extend(values.iter().flat_map(|&v| v.to_le_bytes())),
    }
}

fn type_id(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F16 => 1,
        GgmlType::Q8_0 => 8,
        _ => 0,
    }
}

fn write_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// GGUF's id of a value's type.
fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn write_value(w: &mut impl Write, v: &GgufValue) -> io::Result<()> {
    match v {
        GgufValue::U8(x) => w.write_all(&[*x]),
        GgufValue::I8(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::U16(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::I16(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::U32(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::I32(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::F32(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::Bool(x) => w.write_all(&[u8::from(*x)]),
        GgufValue::String(s) => write_str(w, s),
        GgufValue::Array(items) => {
            // An empty array is written as an array of strings (its element type is not kept).
            let elem = items.first().map_or(8, value_type);
            if items.iter().any(|i| value_type(i) != elem) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a GGUF array holds values of one type",
                ));
            }
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
        GgufValue::U64(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::I64(x) => w.write_all(&x.to_le_bytes()),
        GgufValue::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// Zero bytes that bring `len` to the next multiple of [`ALIGNMENT`].
pub fn padding(len: u64) -> usize {
    (len.div_ceil(ALIGNMENT) * ALIGNMENT - len) as usize
}

/// Writes the header (magic, version, metadata, tensor infos with their data offsets) and the
/// padding before the data section. The caller then writes each tensor's data in plan order,
/// each followed by [`padding`] of its length (as [`write_tensor`] does). Returns the bytes
/// written.
pub fn write_header(
    w: &mut impl Write,
    metadata: &[(String, GgufValue)],
    tensors: &[TensorPlan],
) -> io::Result<u64> {
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_str(&mut head, key)?;
        head.extend_from_slice(&value_type(value).to_le_bytes());
        write_value(&mut head, value)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        write_str(&mut head, &t.name)?;
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        // ggml's ne[0] is the innermost (contiguous) dimension.
        for &d in t.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&type_id(t.ty).to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        let len = t.data_bytes() as u64;
        offset += len + padding(len) as u64;
    }
    let pad = padding(head.len() as u64);
    head.resize(head.len() + pad, 0);
    w.write_all(&head)?;
    Ok(head.len() as u64)
}

/// Writes one tensor's data (`values`, row-major, of `plan`'s shape) and its padding.
pub fn write_tensor(w: &mut impl Write, plan: &TensorPlan, values: &[f32]) -> io::Result<()> {
    if values.len() != plan.elements() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: {} values for shape {:?}",
                plan.name,
                values.len(),
                plan.shape
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(plan.data_bytes() + ALIGNMENT as usize);
    encode(plan.ty, values, &mut bytes);
    let pad = padding(bytes.len() as u64);
    bytes.resize(bytes.len() + pad, 0);
    w.write_all(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{dequantize, GgufFile};

    /// A Q8_0 block computed by hand: max |v| = 2.54, so d = 0.02 and every value is d·q.
    #[test]
    fn q8_0_block_by_hand() {
        let mut v = [0f32; 32];
        v[0] = 2.54; // q = 127
        v[1] = -1.0; // q = -50
        v[2] = 0.047; // 2.35 -> 2
        v[3] = 0.011; // 0.55 -> 1
        let mut out = Vec::new();
        encode(GgmlType::Q8_0, &v, &mut out);
        assert_eq!(out.len(), 34);
        let d = f16::from_le_bytes([out[0], out[1]]).to_f32();
        assert!((d - 0.02).abs() < 1e-5, "scale {d}");
        assert_eq!(out[2] as i8, 127);
        assert_eq!(out[3] as i8, -50);
        assert_eq!(out[4] as i8, 2);
        assert_eq!(out[5] as i8, 1);
        assert!(out[6..].iter().all(|&b| b == 0));
    }

    #[test]
    fn types_follow_the_converter() {
        assert_eq!(type_for(&[64], GgmlType::Q8_0), GgmlType::F32);
        assert_eq!(type_for(&[8, 64], GgmlType::Q8_0), GgmlType::Q8_0);
        assert_eq!(type_for(&[8, 40], GgmlType::Q8_0), GgmlType::F16);
        assert_eq!(type_for(&[8, 40], GgmlType::F16), GgmlType::F16);
    }

    /// What is written reads back through the GGUF reader: every metadata value, every tensor
    /// at its offset, in its type, within that type's rounding.
    #[test]
    fn a_written_file_reads_back() {
        let metadata = vec![
            (
                "general.architecture".to_string(),
                GgufValue::String("llama".into()),
            ),
            ("general.alignment".to_string(), GgufValue::U32(32)),
            ("llama.block_count".to_string(), GgufValue::U32(3)),
            ("x.f".to_string(), GgufValue::F32(0.5)),
            ("x.b".to_string(), GgufValue::Bool(true)),
            (
                "x.tokens".to_string(),
                GgufValue::Array(vec![
                    GgufValue::String("a".into()),
                    GgufValue::String("bc".into()),
                ]),
            ),
            (
                "x.ids".to_string(),
                GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(-3)]),
            ),
        ];
        let vals = |n: usize, k: f32| (0..n).map(|i| ((i as f32) * k).sin()).collect::<Vec<_>>();
        let tensors = [
            (
                TensorPlan {
                    name: "a".into(),
                    shape: vec![7],
                    ty: GgmlType::F32,
                },
                vals(7, 0.3),
            ),
            (
                TensorPlan {
                    name: "b".into(),
                    shape: vec![3, 5],
                    ty: GgmlType::F16,
                },
                vals(15, 0.7),
            ),
            (
                TensorPlan {
                    name: "c".into(),
                    shape: vec![2, 64],
                    ty: GgmlType::Q8_0,
                },
                vals(128, 1.1),
            ),
        ];
        let plans: Vec<_> = tensors.iter().map(|(p, _)| p.clone()).collect();
        let mut bytes = Vec::new();
        write_header(&mut bytes, &metadata, &plans).expect("header");
        for (p, v) in &tensors {
            write_tensor(&mut bytes, p, v).expect("tensor");
        }
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, &bytes).expect("write");
        let f = GgufFile::open(&path).expect("open");
        assert_eq!(f.version, 3);
        for (k, v) in &metadata {
            assert_eq!(f.get(k), Some(v), "{k}");
        }
        for ((p, v), tol) in tensors.iter().zip([0.0, 1e-3, 2.0 / 127.0]) {
            let info = f.tensor_info(&p.name).expect("tensor info");
            assert_eq!(info.shape(), p.shape);
            let got = dequantize(info.ty, f.tensor_bytes(info).expect("bytes"), p.elements())
                .expect("dequantize");
            let worst = got
                .iter()
                .zip(v)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= tol, "{}: off by {worst}", p.name);
        }
    }
}
