//! Export to GGUF: any model backflow loads (a GGUF file, an HF folder, or a LoRA adapter folder
//! merged onto its base) written as one `.gguf` file that llama.cpp, Ollama and LM Studio load,
//! with weights in `F32`, `F16` or `Q8_0` (the types llama.cpp's `convert_hf_to_gguf.py` writes
//! without an imatrix), its tokenizer and chat template in the metadata.
//!
//! The file is streamed: the header is written from the config's shapes, then each tensor is
//! read (merged with the adapter when there is one), converted and written before the next is
//! read, so an export never holds more than one tensor of `f32`. Norms and biases stay `F32`, as
//! the converter keeps them; llama q/k rows are permuted back to llama.cpp's RoPE order (see
//! [`crate::model::gguf::GgufWeights`]). The file appears under its name only when complete.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::model::gguf::{permute_rows, GgmlType, GgufValue, GgufWeights};
use crate::model::gguf_writer::{self, TensorPlan};
use crate::model::llama::{LayerWeight, WeightName, WeightSource};
use crate::model::{Architecture, GgufTokenizerMeta, LlamaConfig, ModelError, TokenizerSource};

use super::checkpoint::Merged;
use super::export::{ExportSource, Exported};
use super::{io_err, TrainError};

/// The weight type of an exported GGUF (`--outtype`, as llama.cpp's converter names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufOutType {
    /// 32-bit floats: exact, 4 bytes a weight.
    F32,
    /// IEEE half: 2 bytes a weight, what the converter writes by default.
    F16,
    /// ggml's 8-bit blocks (`Q8_0`): 1.06 bytes a weight, near-lossless.
    #[value(name = "q8_0")]
    Q8_0,
}

impl GgufOutType {
    fn ggml(self) -> GgmlType {
        match self {
            GgufOutType::F32 => GgmlType::F32,
            GgufOutType::F16 => GgmlType::F16,
            GgufOutType::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0).
    fn file_type(self) -> u32 {
        match self {
            GgufOutType::F32 => 0,
            GgufOutType::F16 => 1,
            GgufOutType::Q8_0 => 7,
        }
    }
}

/// Writes `model` (GGUF file, HF folder, or adapter folder) as the GGUF file `out`, its matrices
/// in `ty`.
pub fn export_gguf(model: &Path, out: &Path, ty: GgufOutType) -> Result<Exported, TrainError> {
    let ExportSource {
        adapter,
        mut base,
        cfg,
        tokenizer: tok_src,
        ..
    } = ExportSource::open(model)?;
    let tokenizer = match tok_src {
        TokenizerSource::Gguf(meta) => *meta,
        TokenizerSource::TokenizerJson(path) => {
            crate::model::tokenizer::Tokenizer::from_tokenizer_json(path)?.gguf_metadata()
        }
        TokenizerSource::Missing => {
            return Err(TrainError::Checkpoint(format!(
                "{} has no tokenizer, and a GGUF file must carry one",
                model.display()
            )))
        }
    };
    let name = model
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let metadata = metadata(&cfg, &tokenizer, &name, ty);
    let plans: Vec<(WeightName, TensorPlan)> = WeightName::all(&cfg)
        .into_iter()
        .map(|w| {
            let shape = w.shape(&cfg);
            let ty = gguf_writer::type_for(&shape, ty.ggml());
            let plan = TensorPlan {
                name: GgufWeights::name(w),
                shape,
                ty,
            };
            (w, plan)
        })
        .collect();

    let partial = crate::output::temp_sibling(out);
    let file = std::fs::File::create(&partial).map_err(io_err(&partial))?;
    let mut w = HashingWriter {
        inner: BufWriter::new(file),
        hash: xxhash_rust::xxh3::Xxh3::new(),
        bytes: 0,
    };
    let written = (|| -> Result<(), TrainError> {
        let only_plans: Vec<TensorPlan> = plans.iter().map(|(_, p)| p.clone()).collect();
        gguf_writer::write_header(&mut w, &metadata, &only_plans).map_err(io_err(&partial))?;
        base.with_source(|src| match &adapter {
            Some(a) => write_tensors(
                &cfg,
                &plans,
                &mut Merged {
                    base: src,
                    adapter: a,
                },
                &mut w,
                &partial,
            ),
            None => write_tensors(&cfg, &plans, src, &mut w, &partial),
        })?;
        w.inner.flush().map_err(io_err(&partial))?;
        w.inner.get_ref().sync_all().map_err(io_err(&partial))
    })();
    if let Err(e) = written {
        // Best effort: the error is what the user needs to see, not a failed cleanup.
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, out).map_err(io_err(out))?;
    Ok(Exported {
        out: out.to_path_buf(),
        version: format!("{:032x}", w.hash.digest128()),
        tensors: plans.len(),
        weight_bytes: w.bytes as usize,
        merged_adapter: adapter.is_some(),
    })
}

/// Counts and hashes what passes through (the export's version is the hash of the whole file).
struct HashingWriter<W: Write> {
    inner: W,
    hash: xxhash_rust::xxh3::Xxh3,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads, checks, converts and writes every planned tensor, one at a time.
fn write_tensors(
    cfg: &LlamaConfig,
    plans: &[(WeightName, TensorPlan)],
    src: &mut dyn WeightSource,
    w: &mut impl Write,
    path: &Path,
) -> Result<(), TrainError> {
    for (name, plan) in plans {
        let t = src.load(*name)?.ok_or_else(|| ModelError::Weight {
            name: plan.name.clone(),
            problem: "missing from the checkpoint".into(),
        })?;
        if t.shape != plan.shape {
            return Err(ModelError::Weight {
                name: plan.name.clone(),
                problem: format!("shape {:?}, the config says {:?}", t.shape, plan.shape),
            }
            .into());
        }
        let data = match (cfg.arch, name) {
            // llama.cpp applies llama's RoPE to adjacent pairs: q and k rows (and their biases)
            // go back to the order its converter writes.
            (Architecture::Llama, WeightName::Layer(_, lw)) => {
                let heads = match lw {
                    LayerWeight::Q | LayerWeight::QBias => Some(cfg.n_heads),
                    LayerWeight::K | LayerWeight::KBias => Some(cfg.n_kv_heads),
                    _ => None,
                };
                match heads {
                    Some(n) => {
                        let rows = plan.shape[0];
                        permute_rows(&t.data, rows, t.data.len() / rows.max(1), n)
                    }
                    None => t.data,
                }
            }
            _ => t.data,
        };
        gguf_writer::write_tensor(w, plan, &data).map_err(io_err(path))?;
    }
    Ok(())
}

/// The file's metadata: what llama.cpp's loader reads for the architecture (the keys
/// `convert_hf_to_gguf.py` writes) and the tokenizer.
fn metadata(
    cfg: &LlamaConfig,
    tok: &GgufTokenizerMeta,
    name: &str,
    ty: GgufOutType,
) -> Vec<(String, GgufValue)> {
    let p = cfg.arch.gguf_prefix();
    let u = |v: usize| GgufValue::U32(v as u32);
    let s = |v: &str| GgufValue::String(v.to_string());
    let mut m: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), s(p)),
        ("general.name".into(), s(name)),
        ("general.file_type".into(), GgufValue::U32(ty.file_type())),
        ("general.quantization_version".into(), GgufValue::U32(2)),
    ];
    let arch_keys = [
        ("context_length", u(cfg.max_seq_len)),
        ("embedding_length", u(cfg.hidden)),
        ("block_count", u(cfg.n_layers)),
        ("feed_forward_length", u(cfg.ffn)),
        ("attention.head_count", u(cfg.n_heads)),
        ("attention.head_count_kv", u(cfg.n_kv_heads)),
        ("attention.key_length", u(cfg.head_dim)),
        ("attention.value_length", u(cfg.head_dim)),
        ("rope.dimension_count", u(cfg.head_dim)),
        ("rope.freq_base", GgufValue::F32(cfg.rope_theta)),
        (
            "attention.layer_norm_rms_epsilon",
            GgufValue::F32(cfg.rms_eps as f32),
        ),
        ("vocab_size", u(cfg.vocab)),
    ];
    m.extend(arch_keys.into_iter().map(|(k, v)| (format!("{p}.{k}"), v)));
    m.push(("tokenizer.ggml.model".into(), s(&tok.model)));
    if let Some(pre) = &tok.pre {
        m.push(("tokenizer.ggml.pre".into(), s(pre)));
    }
    let strings = |v: &[String]| GgufValue::Array(v.iter().map(|t| s(t)).collect());
    m.push(("tokenizer.ggml.tokens".into(), strings(&tok.tokens)));
    m.push((
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(tok.token_types.iter().map(|&t| GgufValue::I32(t)).collect()),
    ));
    if !tok.merges.is_empty() {
        m.push(("tokenizer.ggml.merges".into(), strings(&tok.merges)));
    }
    if !tok.scores.is_empty() {
        m.push((
            "tokenizer.ggml.scores".into(),
            GgufValue::Array(tok.scores.iter().map(|&x| GgufValue::F32(x)).collect()),
        ));
    }
    for (key, id) in [
        ("bos_token_id", tok.bos_id),
        ("eos_token_id", tok.eos_id),
        ("padding_token_id", tok.pad_id),
        ("unknown_token_id", tok.unk_id),
    ] {
        if let Some(id) = id {
            m.push((format!("tokenizer.ggml.{key}"), GgufValue::U32(id)));
        }
    }
    m.push((
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(tok.add_bos),
    ));
    if let Some(t) = &tok.chat_template {
        m.push(("tokenizer.chat_template".into(), s(t)));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{load_checkpoint, GgufFile, Precision};
    use burn::backend::Flex;

    /// Next-token logits of every position of a few tokens, and the model's tokenizer.
    fn logits_of(path: &Path) -> (Vec<f32>, crate::model::tokenizer::Tokenizer) {
        let ck = load_checkpoint::<Flex>(path, &Default::default(), Precision::F32).expect("load");
        let ids = [3u32, 1, 4, 1, 5, 9, 2, 6];
        let toks: Vec<Option<u32>> = ids.iter().map(|&t| Some(t)).collect();
        let mut cache = ck.model.new_cache(1, ids.len());
        let logits = ck
            .model
            .forward(&toks, ids.len(), &mut cache)
            .expect("forward")
            .into_data()
            .to_vec::<f32>()
            .expect("logits");
        (logits, ck.tokenizer.load().expect("tokenizer"))
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    /// An HF folder exported as GGUF loads (through the GGUF reader, which is checked against
    /// llama.cpp's files) as the same model: f32 exactly, f16 and q8_0 within their rounding;
    /// the tokenizer encodes as the tokenizer.json did; the q/k permutation (llama) and the
    /// biases (qwen2) survive the trip.
    #[test]
    fn an_hf_folder_exported_as_gguf_is_the_same_model() {
        for arch in [Architecture::Llama, Architecture::Qwen2] {
            let root = tempfile::tempdir().expect("tmp");
            let base = root.path().join("base");
            let cfg = LlamaConfig {
                arch,
                qkv_bias: arch == Architecture::Qwen2,
                max_seq_len: 256,
                ..crate::train::tiny_config()
            };
            crate::train::tiny_base_of(&base, cfg.clone());
            let (want, tok) = logits_of(&base);
            let text = "what is ice? frozen water.\n";
            let want_ids = tok.encode(text, false);
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let mut sizes = Vec::new();
            for (ty, tol) in [
                (GgufOutType::F32, 1e-4),
                (GgufOutType::F16, 2e-3 * scale),
                (GgufOutType::Q8_0, 3e-2 * scale),
            ] {
                let out = root.path().join(format!("m-{ty:?}.gguf"));
                let done = export_gguf(&base, &out, ty).expect("export");
                assert!(!done.merged_adapter);
                assert_eq!(done.tensors, WeightName::all(&cfg).len());
                assert_eq!(
                    std::fs::metadata(&out).expect("file").len() as usize,
                    done.weight_bytes
                );
                assert!(!crate::output::temp_sibling(&out).exists());
                let file = GgufFile::open(&out).expect("open");
                // GGUF keeps the epsilon as f32, as llama.cpp reads it.
                let eps32 = LlamaConfig {
                    rms_eps: f64::from(cfg.rms_eps as f32),
                    ..cfg.clone()
                };
                assert_eq!(LlamaConfig::from_gguf(&file).expect("config"), eps32);
                let (got, got_tok) = logits_of(&out);
                let d = max_diff(&want, &got);
                assert!(
                    d <= tol,
                    "{arch:?} {ty:?}: logits off by {d} (tolerance {tol})"
                );
                assert_eq!(got_tok.encode(text, false), want_ids, "{arch:?} {ty:?}");
                sizes.push(done.weight_bytes);
            }
            assert!(sizes[0] > sizes[1] && sizes[1] > sizes[2], "{sizes:?}");
        }
    }

    /// Where the writer fails, nothing is left under the output name.
    #[test]
    fn a_model_without_a_tokenizer_is_refused_and_nothing_is_written() {
        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base");
        crate::train::tiny_base(&base);
        std::fs::remove_file(base.join("tokenizer.json")).expect("rm");
        let out = root.path().join("m.gguf");
        let err = export_gguf(&base, &out, GgufOutType::F16).expect_err("no tokenizer");
        assert!(err.to_string().contains("no tokenizer"), "{err}");
        assert!(!out.exists() && !crate::output::temp_sibling(&out).exists());
    }
}
