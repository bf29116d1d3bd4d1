//! GGUF reader: header (v2 and v3), metadata of every value type, tensor infos, alignment,
//! and dequantization of the common ggml tensor types to `f32`.
//!
//! The file is memory-mapped; [`GgufFile::tensor_f32`] dequantizes one tensor at a time so a
//! loader never holds more than the mapped file plus one `f32` copy of the tensor it is building.
//!
//! Block layouts follow ggml's `ggml-common.h` / `ggml-quants.c` exactly (checked against the
//! `gguf` Python package's numpy dequantizer by `tests/model.rs`).
//!
//! Why one file of this size: one format, read end to end; most of the length is one dequantizer
//! per block type, each a few lines of ggml's layout checked against the `gguf` package.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use super::config::{Architecture, LlamaConfig};
use super::llama::{HostTensor, LayerWeight, WeightName, WeightSource};
use super::quant::{Q4Matrix, Q6Matrix, Q8Matrix, QuantWeight};
use super::ModelError;

/// The four bytes every GGUF file starts with ("GGUF" read as a little-endian u32).
const GGUF_MAGIC: u32 = 0x4655_4747;
/// Alignment of the tensor data section when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Elements per block of the "legacy" quants (Q4_0, Q4_1, Q8_0, ...).
const QK: usize = 32;
/// Elements per super-block of the k-quants.
pub(crate) const QK_K: usize = 256;

/// Errors while reading a GGUF file or one of its tensors.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic.
    #[error("not a GGUF file (bad magic {0:#010x})")]
    BadMagic(u32),
    /// A GGUF version this reader does not understand (v1 used 32-bit counts).
    #[error("unsupported GGUF version {0} (2 and 3 are supported)")]
    UnsupportedVersion(u32),
    /// The header or metadata ends before it should, or an offset points outside the file.
    #[error("truncated or corrupt GGUF file: {0}")]
    Corrupt(String),
    /// A metadata value type id that is not in the GGUF spec.
    #[error("unknown GGUF metadata value type {0}")]
    UnknownValueType(u32),
    /// A tensor type this reader cannot dequantize.
    #[error("tensor {name}: unsupported tensor type {ty}")]
    UnsupportedTensorType {
        /// The tensor's name.
        name: String,
        /// The ggml type (name, or the numeric id when unknown).
        ty: String,
    },
    /// A tensor that was asked for is not in the file.
    #[error("tensor {0} not found in the GGUF file")]
    MissingTensor(String),
    /// A metadata key that was required is missing or has the wrong type.
    #[error("metadata key {0} missing or of the wrong type")]
    MissingKey(String),
}

/// One metadata value. Arrays keep their element values (nested arrays included).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `UINT8`
    U8(u8),
    /// `INT8`
    I8(i8),
    /// `UINT16`
    U16(u16),
    /// `INT16`
    I16(i16),
    /// `UINT32`
    U32(u32),
    /// `INT32`
    I32(i32),
    /// `FLOAT32`
    F32(f32),
    /// `BOOL`
    Bool(bool),
    /// `STRING` (invalid UTF-8 is replaced, as tokens of byte-level vocabularies never need it)
    String(String),
    /// `ARRAY`
    Array(Vec<GgufValue>),
    /// `UINT64`
    U64(u64),
    /// `INT64`
    I64(i64),
    /// `FLOAT64`
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, when it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, when it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor element types (the ids of `enum ggml_type`).
// ggml's own spelling (Q4_K) is what users search for and see in llama.cpp logs.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// 32 values: f16 scale, 16 bytes of 4-bit values offset by 8.
    Q4_0,
    /// 32 values: f16 scale and minimum, 16 bytes of 4-bit values.
    Q4_1,
    /// 32 values: f16 scale, 5-bit values offset by 16 (4 bits in nibbles, the 5th in a u32).
    Q5_0,
    /// 32 values: f16 scale and minimum, 5-bit values.
    Q5_1,
    /// 32 values: f16 scale, 32 signed bytes.
    Q8_0,
    /// 256 values of 2 bits in 16 sub-blocks with 4-bit scales and mins.
    Q2_K,
    /// 256 values of 3 bits (2 low bits + a high-bit mask) in 16 sub-blocks with 6-bit scales.
    Q3_K,
    /// 256 values in 8 sub-blocks with 6-bit scales and mins.
    Q4_K,
    /// 256 values of 5 bits in 8 sub-blocks with 6-bit scales and mins.
    Q5_K,
    /// 256 values of 6 bits in 16 sub-blocks with 8-bit scales.
    Q6_K,
    /// bfloat16.
    BF16,
    /// Any other ggml type (kept by id so the error can name it).
    Other(u32),
}

impl GgmlType {
    /// The type with ggml id `id`.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// The ggml name of the type (`"q4_K"`, ...), or its numeric id for unknown types.
    pub fn name(&self) -> String {
        match self {
            GgmlType::F32 => "F32".into(),
            GgmlType::F16 => "F16".into(),
            GgmlType::Q4_0 => "Q4_0".into(),
            GgmlType::Q4_1 => "Q4_1".into(),
            GgmlType::Q5_0 => "Q5_0".into(),
            GgmlType::Q5_1 => "Q5_1".into(),
            GgmlType::Q8_0 => "Q8_0".into(),
            GgmlType::Q2_K => "Q2_K".into(),
            GgmlType::Q3_K => "Q3_K".into(),
            GgmlType::Q4_K => "Q4_K".into(),
            GgmlType::Q5_K => "Q5_K".into(),
            GgmlType::Q6_K => "Q6_K".into(),
            GgmlType::BF16 => "BF16".into(),
            GgmlType::Other(id) => match id {
                9 => "Q8_1".into(),
                15 => "Q8_K".into(),
                _ => format!("ggml type id {id}"),
            },
        }
    }

    /// `(elements per block, bytes per block)`, or `None` for unsupported types.
    pub fn block_layout(&self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::BF16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((QK, 2 + QK / 2)),
            GgmlType::Q4_1 => Some((QK, 4 + QK / 2)),
            GgmlType::Q5_0 => Some((QK, 2 + 4 + QK / 2)),
            GgmlType::Q5_1 => Some((QK, 4 + 4 + QK / 2)),
            GgmlType::Q8_0 => Some((QK, 2 + QK)),
            GgmlType::Q2_K => Some((QK_K, QK_K / 16 + QK_K / 4 + 2 + 2)),
            GgmlType::Q3_K => Some((QK_K, QK_K / 8 + QK_K / 4 + 12 + 2)),
            GgmlType::Q4_K => Some((QK_K, 4 + 12 + QK_K / 2)),
            GgmlType::Q5_K => Some((QK_K, 4 + 12 + QK_K / 8 + QK_K / 2)),
            GgmlType::Q6_K => Some((QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2)),
            GgmlType::Other(_) => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml dimensions, fastest-varying first (`ne[0]` is the row length).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in row-major order (slowest first), as PyTorch/burn would write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// Tokenizer data stored in a GGUF's `tokenizer.*` metadata, for `Tokenizer::from_gguf_metadata`.
#[derive(Debug, Clone, Default)]
pub struct GgufTokenizerMeta {
    /// `tokenizer.ggml.model` (`gpt2` = byte-level BPE, `llama` = SentencePiece BPE, ...).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer name (`smollm`, `qwen2`, `llama-bpe`, ...).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the vocabulary, by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`: BPE merges as `"left right"`, by rank.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece vocabularies); empty when absent.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (false when absent).
    pub add_bos: bool,
    /// `tokenizer.chat_template` (a Jinja template), when present.
    pub chat_template: Option<String>,
}

/// A memory-mapped GGUF file: metadata, tensor infos and access to the tensor data.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Every metadata key and value, in file order lookup by key.
    pub metadata: HashMap<String, GgufValue>,
    /// Tensor infos, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// Alignment of the data section (`general.alignment`, default 32).
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_offset: u64,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian reader over the mapped header.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                GgufError::Corrupt(format!(
                    "read of {n} bytes at offset {} past the end",
                    self.pos
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, GgufError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length prefix that must fit in the remaining bytes (each element is at least
    /// `min_elem` bytes), so a corrupt count cannot make us allocate terabytes.
    fn count(&mut self, min_elem: usize) -> Result<usize, GgufError> {
        let n = self.u64()?;
        let remaining = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_elem.max(1) as u64) > remaining {
            return Err(GgufError::Corrupt(format!(
                "count {n} at offset {} exceeds the file",
                self.pos
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.count(1)?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U8(self.u8()?),
            1 => GgufValue::I8(self.u8()? as i8),
            2 => GgufValue::U16(self.u16()?),
            3 => GgufValue::I16(self.u16()? as i16),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(self.u32()? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32()?)),
            7 => GgufValue::Bool(self.u8()? != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 8 {
                    return Err(GgufError::Corrupt("arrays nested too deeply".into()));
                }
                let elem_ty = self.u32()?;
                let n = self.count(1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(self.u64()? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64()?)),
            other => return Err(GgufError::UnknownValueType(other)),
        })
    }
}

impl GgufFile {
    /// Maps and parses a GGUF file (metadata and tensor infos; tensor data stays mapped).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the mapping is read-only; a checkpoint being rewritten while we read it is
        // outside what any loader can defend against (llama.cpp maps files the same way).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<Self, GgufError> {
        let mut c = Cursor { buf: &mmap, pos: 0 };
        let magic = c.u32()?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        // Each tensor info is at least 8+4+8+4+8 bytes; each KV at least 8+4+1.
        let n_tensors = c.count(32)?;
        let n_kv = c.count(13)?;
        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let value = c.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims > 8 {
                return Err(GgufError::Corrupt(format!(
                    "tensor {name} has {n_dims} dims"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64()?);
            }
            // Found by fuzzing: dims whose product overflows would wrap to a small element
            // count that passes the bounds check.
            if dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .is_none()
            {
                return Err(GgufError::Corrupt(format!(
                    "tensor {name} has dims {dims:?}: more elements than a u64 counts"
                )));
            }
            let ty = GgmlType::from_id(c.u32()?);
            let offset = c.u64()?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| {
                    GgufError::Corrupt("general.alignment is not a power of two".into())
                })?,
            None => DEFAULT_ALIGNMENT,
        };
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path,
            mmap,
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            by_name,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A required unsigned integer metadata value.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)
            .and_then(GgufValue::as_u64)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    /// A required float metadata value.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)
            .and_then(GgufValue::as_f64)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    /// A required string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)
            .and_then(GgufValue::as_str)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// The info of a tensor by name.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor, bounds-checked against the file.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8], GgufError> {
        let (block_elems, block_bytes) =
            info.ty
                .block_layout()
                .ok_or_else(|| GgufError::UnsupportedTensorType {
                    name: info.name.clone(),
                    ty: info.ty.name(),
                })?;
        let n = info.n_elements() as usize;
        if !n.is_multiple_of(block_elems) {
            return Err(GgufError::Corrupt(format!(
                "tensor {}: {n} elements is not a multiple of the block size {block_elems}",
                info.name
            )));
        }
        let len = (n / block_elems).checked_mul(block_bytes).ok_or_else(|| {
            GgufError::Corrupt(format!(
                "tensor {}: {n} elements is more bytes than memory holds",
                info.name
            ))
        })?;
        let start = self
            .data_offset
            .checked_add(info.offset)
            .map(|s| s as usize);
        match start {
            Some(s) if s.checked_add(len).is_some_and(|e| e <= self.mmap.len()) => {
                Ok(&self.mmap[s..s + len])
            }
            _ => Err(GgufError::Corrupt(format!(
                "tensor {} data lies outside the file",
                info.name
            ))),
        }
    }

    /// Tells the kernel that a tensor's bytes, once converted, are not needed again: their
    /// pages leave this process's resident set (read back from the file if touched again).
    /// Loading touches every page of the file once; without this, a model's peak resident
    /// size is the file plus the model built from it.
    pub fn release(&self, info: &GgufTensorInfo) {
        let Ok(bytes) = self.tensor_bytes(info) else {
            return;
        };
        let offset = bytes.as_ptr() as usize - self.mmap.as_ptr() as usize;
        #[cfg(unix)]
        // SAFETY: the map is a read-only file mapping: MADV_DONTNEED drops its pages and a later
        // access reads them from the file again, the same bytes (a file changed under a map is
        // already outside what a map can guard against). Advice only: an error changes nothing.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                offset,
                bytes.len(),
            );
        }
        #[cfg(not(unix))]
        let _ = offset;
    }

    /// Dequantizes a tensor by name to `f32`, row-major with shape [`GgufTensorInfo::shape`].
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let bytes = self.tensor_bytes(info)?;
        let values = dequantize(info.ty, bytes, info.n_elements() as usize).map_err(|_| {
            GgufError::UnsupportedTensorType {
                name: name.to_string(),
                ty: info.ty.name(),
            }
        })?;
        self.release(info);
        Ok((values, info.shape()))
    }

    /// A 2-D tensor by name as 8-bit blocks, `[rows, cols]` as [`GgufTensorInfo::shape`], its
    /// row `r` taken from the file's row `source_row(r)`: each row dequantized and requantized
    /// on its own (rows in parallel), so the tensor is never held as `f32`.
    pub fn tensor_q8(
        &self,
        name: &str,
        source_row: impl Fn(usize) -> usize + Sync,
    ) -> Result<Q8Matrix, GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let unsupported = || GgufError::UnsupportedTensorType {
            name: name.to_string(),
            ty: info.ty.name(),
        };
        let (block_elems, block_bytes) = info.ty.block_layout().ok_or_else(unsupported)?;
        let shape = info.shape();
        let [rows, cols] = shape[..] else {
            return Err(GgufError::Corrupt(format!(
                "tensor {name} has shape {shape:?}, not a matrix"
            )));
        };
        if cols % block_elems != 0 {
            return Err(GgufError::Corrupt(format!(
                "tensor {name}: rows of {cols} values do not split into blocks of {block_elems}"
            )));
        }
        let bytes = self.tensor_bytes(info)?;
        let row_bytes = cols / block_elems * block_bytes;
        let q = Q8Matrix::from_rows(rows, cols, |r, out| {
            let src = source_row(r);
            let row = bytes
                .get(src * row_bytes..(src + 1) * row_bytes)
                .ok_or_else(|| GgufError::Corrupt(format!("tensor {name}: row {src} missing")))?;
            let values = dequantize(info.ty, row, cols).map_err(|_| unsupported())?;
            out.copy_from_slice(&values);
            Ok(())
        });
        self.release(info);
        q
    }

    /// The tokenizer metadata (`tokenizer.*` keys).
    pub fn tokenizer_meta(&self) -> Result<GgufTokenizerMeta, GgufError> {
        let strings = |key: &str| -> Vec<String> {
            self.get(key)
                .and_then(GgufValue::as_array)
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        let id = |key: &str| {
            self.get(key)
                .and_then(GgufValue::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        let tokens = strings("tokenizer.ggml.tokens");
        if tokens.is_empty() {
            return Err(GgufError::MissingKey("tokenizer.ggml.tokens".into()));
        }
        Ok(GgufTokenizerMeta {
            model: self.get_str("tokenizer.ggml.model")?.to_string(),
            pre: self
                .get("tokenizer.ggml.pre")
                .and_then(GgufValue::as_str)
                .map(str::to_string),
            tokens,
            token_types: self
                .get("tokenizer.ggml.token_type")
                .and_then(GgufValue::as_array)
                .map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1) as i32).collect())
                .unwrap_or_default(),
            merges: strings("tokenizer.ggml.merges"),
            scores: self
                .get("tokenizer.ggml.scores")
                .and_then(GgufValue::as_array)
                .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect())
                .unwrap_or_default(),
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            pad_id: id("tokenizer.ggml.padding_token_id"),
            unk_id: id("tokenizer.ggml.unknown_token_id"),
            add_bos: self
                .get("tokenizer.ggml.add_bos_token")
                .and_then(GgufValue::as_bool)
                .unwrap_or(false),
            chat_template: self
                .get("tokenizer.chat_template")
                .and_then(GgufValue::as_str)
                .map(str::to_string),
        })
    }
}

/// The error of [`dequantize`]: the type has no dequantizer here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsupportedType(pub GgmlType);

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n` elements of type `ty` from `bytes` (which must hold exactly `n` elements'
/// blocks, as [`GgufFile::tensor_bytes`] guarantees).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, UnsupportedType> {
    let (block_elems, block_bytes) = ty.block_layout().ok_or(UnsupportedType(ty))?;
    let n_blocks = n / block_elems;
    let bytes = &bytes[..(n_blocks * block_bytes).min(bytes.len())];
    let mut out = vec![0f32; n];
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            // block_q4_0 { ggml_half d; uint8_t qs[16]; }: low nibbles are elements 0..16,
            // high nibbles 16..32, both offset by 8.
            for (y, b) in out
                .chunks_exact_mut(QK)
                .zip(bytes.chunks_exact(block_bytes))
            {
                let d = f16_at(b, 0);
                let qs = &b[2..];
                for j in 0..QK / 2 {
                    y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                    y[j + QK / 2] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            // block_q4_1 { ggml_half d; ggml_half m; uint8_t qs[16]; }: x = q * d + m.
            for (y, b) in out
                .chunks_exact_mut(QK)
                .zip(bytes.chunks_exact(block_bytes))
            {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..];
                for j in 0..QK / 2 {
                    y[j] = (qs[j] & 0x0F) as f32 * d + m;
                    y[j + QK / 2] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }: x = (q5 - 16) * d;
            // block_q5_1 { ggml_half d; ggml_half m; uint8_t qh[4]; uint8_t qs[16]; }:
            // x = q5 * d + m. Nibbles as in Q4_0; bit j of qh is the 5th bit of element j.
            let with_min = ty == GgmlType::Q5_1;
            let at = if with_min { 4 } else { 2 };
            for (y, b) in out
                .chunks_exact_mut(QK)
                .zip(bytes.chunks_exact(block_bytes))
            {
                let d = f16_at(b, 0);
                let m = if with_min { f16_at(b, 2) } else { 0.0 };
                let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                let qs = &b[at + 4..];
                for j in 0..QK / 2 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    let (q0, q1) = ((qs[j] & 0x0F) | h0, (qs[j] >> 4) | h1);
                    if with_min {
                        y[j] = q0 as f32 * d + m;
                        y[j + QK / 2] = q1 as f32 * d + m;
                    } else {
                        y[j] = (q0 as i32 - 16) as f32 * d;
                        y[j + QK / 2] = (q1 as i32 - 16) as f32 * d;
                    }
                }
            }
        }
        GgmlType::Q2_K => {
            // block_q2_K { uint8_t scales[16]; uint8_t qs[64]; ggml_half d; ggml_half dmin; }:
            // two halves of 128; each byte of a half's 32 holds four 2-bit values (shifts
            // 0, 2, 4, 6), 16 values per 4-bit scale (low nibble) and min (high nibble).
            for (y, b) in out
                .chunks_exact_mut(QK_K)
                .zip(bytes.chunks_exact(block_bytes))
            {
                let (scales, qs) = (&b[..16], &b[16..80]);
                let d = f16_at(b, 80);
                let dmin = f16_at(b, 82);
                let mut is = 0;
                for half in 0..2 {
                    let q = &qs[32 * half..32 * half + 32];
                    for j in 0..4 {
                        let shift = 2 * j;
                        for part in 0..2 {
                            let sc = scales[is];
                            is += 1;
                            let (dl, ml) = (d * (sc & 0x0F) as f32, dmin * (sc >> 4) as f32);
                            let y = &mut y[128 * half + 32 * j + 16 * part..][..16];
                            for (l, v) in y.iter_mut().enumerate() {
                                *v = dl * ((q[16 * part + l] >> shift) & 3) as f32 - ml;
                            }
                        }
                    }
                }
            }
        }
        GgmlType::Q3_K => {
            // block_q3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; ggml_half d; }:
            // laid out as Q2_K, each value's 3rd bit in hmask (bit j of byte l for the j-th group
            // of 32; a clear bit subtracts 4); sixteen 6-bit scales offset by 32.
            for (y, b) in out
                .chunks_exact_mut(QK_K)
                .zip(bytes.chunks_exact(block_bytes))
            {
                let (hmask, qs) = (&b[..32], &b[32..96]);
                let scales = q3k_scales(&b[96..108]);
                let d = f16_at(b, 108);
                let mut is = 0;
                for half in 0..2 {
                    let q = &qs[32 * half..32 * half + 32];
                    for j in 0..4 {
                        let shift = 2 * j;
                        let bit = 1u8 << (4 * half + j);
                        for part in 0..2 {
                            let dl = d * (scales[is] as i32 - 32) as f32;
                            is += 1;
                            let y = &mut y[128 * half + 32 * j + 16 * part..][..16];
                            for (l, v) in y.iter_mut().enumerate() {
                                let k = 16 * part + l;
                                let low = ((q[k] >> shift) & 3) as i32;
                                let high = if hmask[k] & bit != 0 { 0 } else { 4 };
                                *v = dl * (low - high) as f32;
                            }
                        }
                    }
                }
            }
        }
        GgmlType::Q5_K => {
            // block_q5_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qh[32];
            // uint8_t qs[128]; }: Q4_K's layout plus a 5th bit per value, bit 2g (low nibbles)
            // and 2g+1 (high nibbles) of qh[l] for group g of 64.
            for (y, b) in out
                .chunks_exact_mut(QK_K)
                .zip(bytes.chunks_exact(block_bytes))
            {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qh = &b[16..48];
                let qs = &b[48..];
                for g in 0..QK_K / 64 {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * g), 1u8 << (2 * g + 1));
                    let q = &qs[32 * g..32 * g + 32];
                    let y = &mut y[64 * g..64 * g + 64];
                    for l in 0..32 {
                        let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        y[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - m1;
                        y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q8_0 => {
            // block_q8_0 { ggml_half d; int8_t qs[32]; }
            for (y, b) in out
                .chunks_exact_mut(QK)
                .zip(bytes.chunks_exact(block_bytes))
            {
                let d = f16_at(b, 0);
                for j in 0..QK {
                    y[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_K => {
            // block_q4_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qs[128]; }
            for (y, b) in out
                .chunks_exact_mut(QK_K)
                .zip(bytes.chunks_exact(block_bytes))
            {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..];
                // Four groups of 64: the low nibbles of 32 bytes, then their high nibbles,
                // each half with its own 6-bit scale and min.
                for g in 0..QK_K / 64 {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * g..32 * g + 32];
                    let y = &mut y[64 * g..64 * g + 64];
                    for l in 0..32 {
                        y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
                        y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for (y, b) in out
                .chunks_exact_mut(QK_K)
                .zip(bytes.chunks_exact(block_bytes))
            {
                dequantize_q6_k(b, y);
            }
        }
        GgmlType::Other(_) => return Err(UnsupportedType(ty)),
    }
    Ok(out)
}

/// One `Q6_K` super-block's 256 values into `y`.
pub(crate) fn dequantize_q6_k(b: &[u8], y: &mut [f32]) {
    // block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; }
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Q3_K's sixteen 6-bit scales, unpacked from 12 bytes as ggml's `dequantize_row_q3_K` does:
/// the low 4 bits of scale i are nibbles of bytes 0..8 (scales 0..8 low nibbles, 8..16 high),
/// the top 2 bits come from bytes 8..12, two bits per scale.
fn q3k_scales(packed: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 {
            packed[i] & 0x0F
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = low | (high << 4);
    }
    out
}

/// ggml's `get_scale_min_k4`: the j-th 6-bit (scale, min) pair packed in 12 bytes.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// GGUF tensors as a [`WeightSource`], in Hugging Face layout.
///
/// llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of
/// each head of `attn_q`/`attn_k` from RoPE "halves" order (HF: dims `i` and `i + d/2` rotate
/// together) to adjacent pairs (dims `2i` and `2i + 1`), by
/// `w.reshape(n_head, 2, d/2, in).swapaxes(1, 2)`. We invert it here, so GGUF and HF
/// checkpoints share one RoPE: HF row `h·d + half·d/2 + i` is GGUF row `h·d + 2i + half`.
/// (k uses the kv head count.) Qwen2 GGUFs are not permuted (NEOX RoPE is already halves).
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    cfg: &'a LlamaConfig,
}

impl<'a> GgufWeights<'a> {
    /// Weights of `file`, whose config is `cfg`.
    pub fn new(file: &'a GgufFile, cfg: &'a LlamaConfig) -> Self {
        GgufWeights { file, cfg }
    }

    /// The GGUF name of a weight (llama.cpp's `LLM_TENSOR_NAMES`).
    pub fn name(name: WeightName) -> String {
        match name {
            WeightName::Embedding => "token_embd.weight".into(),
            WeightName::OutputNorm => "output_norm.weight".into(),
            WeightName::Output => "output.weight".into(),
            WeightName::Layer(l, w) => {
                let t = match w {
                    LayerWeight::AttnNorm => "attn_norm.weight",
                    LayerWeight::Q => "attn_q.weight",
                    LayerWeight::K => "attn_k.weight",
                    LayerWeight::V => "attn_v.weight",
                    LayerWeight::QBias => "attn_q.bias",
                    LayerWeight::KBias => "attn_k.bias",
                    LayerWeight::VBias => "attn_v.bias",
                    LayerWeight::O => "attn_output.weight",
                    LayerWeight::FfnNorm => "ffn_norm.weight",
                    LayerWeight::Gate => "ffn_gate.weight",
                    LayerWeight::Up => "ffn_up.weight",
                    LayerWeight::Down => "ffn_down.weight",
                };
                format!("blk.{l}.{t}")
            }
        }
    }
}

impl GgufWeights<'_> {
    /// The rows per head of a weight whose rows llama.cpp permuted (llama's q and k, see
    /// [`GgufWeights`]), or `None` for every other weight; an error when its `rows` do not
    /// split into the config's heads.
    fn permuted_head_rows(
        &self,
        name: WeightName,
        rows: usize,
    ) -> Result<Option<usize>, ModelError> {
        if self.cfg.arch != Architecture::Llama {
            return Ok(None);
        }
        let n_head = match name {
            WeightName::Layer(_, LayerWeight::Q | LayerWeight::QBias) => self.cfg.n_heads,
            WeightName::Layer(_, LayerWeight::K | LayerWeight::KBias) => self.cfg.n_kv_heads,
            _ => return Ok(None),
        };
        if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
            return Err(ModelError::Weight {
                name: Self::name(name),
                problem: format!("{rows} rows do not split into {n_head} heads"),
            });
        }
        Ok(Some(rows / n_head))
    }
}

impl WeightSource for GgufWeights<'_> {
    fn load_quant(
        &mut self,
        name: WeightName,
        keep_native: bool,
    ) -> Result<Option<QuantWeight>, ModelError> {
        let gname = Self::name(name);
        let Some(info) = self.file.tensor_info(&gname) else {
            return Ok(None);
        };
        let shape = info.shape();
        let rows = shape.first().copied().unwrap_or(0);
        let head_rows = self.permuted_head_rows(name, rows)?;
        let source_row = |r| head_rows.map_or(r, |d| unpermuted_source_row(r, d));
        if keep_native && Q4Matrix::keeps(info.ty) && shape.len() == 2 {
            let bytes = self.file.tensor_bytes(info)?;
            let q =
                Q4Matrix::from_gguf(info.ty, bytes, rows, shape[1], source_row).map_err(|e| {
                    ModelError::Weight {
                        name: gname.clone(),
                        problem: e.to_string(),
                    }
                })?;
            self.file.release(info);
            return Ok(Some(QuantWeight::Q4(q)));
        }
        if keep_native && Q6Matrix::keeps(info.ty) && shape.len() == 2 {
            let bytes = self.file.tensor_bytes(info)?;
            let q =
                Q6Matrix::from_gguf(info.ty, bytes, rows, shape[1], source_row).map_err(|e| {
                    ModelError::Weight {
                        name: gname.clone(),
                        problem: e.to_string(),
                    }
                })?;
            self.file.release(info);
            return Ok(Some(QuantWeight::Q6(q)));
        }
        Ok(Some(QuantWeight::Q8(
            self.file.tensor_q8(&gname, source_row)?,
        )))
    }

    fn load(&mut self, name: WeightName) -> Result<Option<HostTensor>, ModelError> {
        let gname = Self::name(name);
        if self.file.tensor_info(&gname).is_none() {
            return Ok(None);
        }
        let (mut data, shape) = self.file.tensor_f32(&gname)?;
        let rows = shape.first().copied().unwrap_or(0);
        if let Some(d) = self.permuted_head_rows(name, rows)? {
            let cols = data.len() / rows.max(1);
            data = unpermute_rows(&data, rows, cols, rows / d);
        }
        Ok(Some(HostTensor { data, shape }))
    }
}

/// The file row that llama.cpp's q/k permutation put at row `r` of the "halves" layout, for
/// heads of `d` rows: [`unpermute_rows`] row by row.
fn unpermuted_source_row(r: usize, d: usize) -> usize {
    let half = d / 2;
    let (h, rem) = (r / d, r % d);
    let (part, i) = (rem / half, rem % half);
    h * d + 2 * i + part
}

/// Inverse of llama.cpp's q/k row permutation (see [`GgufWeights`]): every row moved as
/// `unpermuted_source_row` says.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let d = rows / n_head.max(1);
    let mut out = vec![0f32; data.len()];
    for (r, row) in out.chunks_exact_mut(cols.max(1)).enumerate() {
        let src = unpermuted_source_row(r, d);
        row.copy_from_slice(&data[src * cols..(src + 1) * cols]);
    }
    out
}

/// llama.cpp's q/k row permutation (the converter's `LlamaModel.permute`), the inverse of
/// [`unpermute_rows`]: what a GGUF writer applies to Hugging Face rows of a llama `attn_q`/`attn_k`.
pub fn permute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let d = rows / n_head.max(1);
    let mut out = vec![0f32; data.len()];
    for (r, row) in data.chunks_exact(cols.max(1)).enumerate() {
        let dst = unpermuted_source_row(r, d);
        out[dst * cols..(dst + 1) * cols].copy_from_slice(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a minimal GGUF v3 file in memory: the reader must find every value back.
    fn tiny_gguf() -> Vec<u8> {
        tiny_gguf_with_dims(2, 3)
    }

    /// [`tiny_gguf`] with its one F32 tensor declared `d0 x d1` (its data stays 6 floats).
    fn tiny_gguf_with_dims(d0: u64, d1: u64) -> Vec<u8> {
        let mut b = Vec::new();
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        b.extend(GGUF_MAGIC.to_le_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(3u64.to_le_bytes()); // kv
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "a.list");
        b.extend(9u32.to_le_bytes());
        b.extend(5u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend((-7i32).to_le_bytes());
        b.extend(9i32.to_le_bytes());
        s(&mut b, "a.f");
        b.extend(12u32.to_le_bytes());
        b.extend(2.5f64.to_le_bytes());
        s(&mut b, "t");
        b.extend(2u32.to_le_bytes());
        b.extend(d0.to_le_bytes());
        b.extend(d1.to_le_bytes());
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for i in 0..6 {
            b.extend((i as f32 * 1.5).to_le_bytes());
        }
        b
    }

    fn open_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        let dir = tempfile::tempdir().map_err(|e| GgufError::Io {
            path: PathBuf::new(),
            source: e,
        })?;
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, bytes).map_err(|e| GgufError::Io {
            path: path.clone(),
            source: e,
        })?;
        GgufFile::open(&path)
    }

    #[test]
    fn parses_constructed_file() {
        let f = open_bytes(&tiny_gguf()).expect("parse");
        assert_eq!(f.version, 3);
        assert_eq!(f.architecture().ok(), Some("llama"));
        assert_eq!(
            f.get("a.list"),
            Some(&GgufValue::Array(vec![
                GgufValue::I32(-7),
                GgufValue::I32(9)
            ]))
        );
        assert_eq!(f.get_f64("a.f").ok(), Some(2.5));
        let (v, shape) = f.tensor_f32("t").expect("tensor");
        assert_eq!(shape, vec![3, 2]);
        assert_eq!(v, vec![0.0, 1.5, 3.0, 4.5, 6.0, 7.5]);
        // Reading released its pages; read again, they come back from the file unchanged.
        assert_eq!(f.tensor_f32("t").expect("tensor again").0, v);
    }

    #[test]
    fn rejects_bad_input() {
        let mut bytes = tiny_gguf();
        bytes[0] = b'X';
        assert!(matches!(open_bytes(&bytes), Err(GgufError::BadMagic(_))));
        let mut bytes = tiny_gguf();
        bytes[4] = 1;
        assert!(matches!(
            open_bytes(&bytes),
            Err(GgufError::UnsupportedVersion(1))
        ));
        let bytes = tiny_gguf();
        assert!(matches!(
            open_bytes(&bytes[..40]),
            Err(GgufError::Corrupt(_))
        ));
        // Found by fuzzing (scripts/fuzz.sh gguf): dims whose product overflows u64.
        assert!(matches!(
            open_bytes(&tiny_gguf_with_dims(1 << 33, 1 << 33)),
            Err(GgufError::Corrupt(_))
        ));
        // A count that fits, but whose bytes (4 per F32) do not: an error, not a wrap.
        let f = open_bytes(&tiny_gguf_with_dims(1 << 62, 1)).expect("the header parses");
        assert!(matches!(f.tensor_f32("t"), Err(GgufError::Corrupt(_))));
    }

    #[test]
    fn q4_0_block_by_hand() {
        // d = 2.0, nibbles: low = j, high = 15 - j.
        let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let y = dequantize(GgmlType::Q4_0, &b, 32).expect("q4_0");
        assert_eq!(y[0], -16.0); // (0 - 8) * 2
        assert_eq!(y[15], 14.0); // (15 - 8) * 2
        assert_eq!(y[16], 14.0); // high nibble of byte 0 is 15
        assert_eq!(y[31], -16.0);
    }

    #[test]
    fn unpermute_inverts_the_converter_permutation() {
        // convert_hf_to_gguf.py: w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(w.shape)
        // for 2 heads of d = 4, one column: HF rows [a0 a1 b0 b1 | c0 c1 e0 e1]
        // become GGUF rows [a0 b0 a1 b1 | c0 e0 c1 e1].
        let gguf = [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0];
        let hf = unpermute_rows(&gguf, 8, 1, 2);
        assert_eq!(hf, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        // The writer's permutation, from the same hand-made example.
        assert_eq!(permute_rows(&hf, 8, 1, 2), gguf.to_vec());
    }

    #[test]
    fn unsupported_type_is_an_error() {
        assert_eq!(
            dequantize(GgmlType::Other(9), &[0u8; 36], 32),
            Err(UnsupportedType(GgmlType::Other(9)))
        );
        assert_eq!(GgmlType::Other(9).name(), "Q8_1");
        assert_eq!(GgmlType::from_id(13), GgmlType::Q5_K);
    }
}
