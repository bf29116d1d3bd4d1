//! Checkpoints: Hugging Face folders (`config.json`, `model.safetensors` with merged weights,
//! `tokenizer.json`) and PEFT LoRA adapters (`adapter_config.json`,
//! `adapter_model.safetensors`), plus `backflow.json` (version = content hash of the weights)
//! and the resume state (`trainer_state.json`, `optimizer.bin`). A folder is written next to
//! its destination and renamed into place, so readers never see a half-written checkpoint.
//!
//! [`super::load`] loads any of them for inference; [`load_for_loss`] as the training model, an
//! adapter unmerged over the base named in its `adapter_config.json`.
//!
//! Why one file of this size: every kind of checkpoint folder (full, adapter, GGUF in) is read and
//! written here, so the file names, the version hash and the atomic folder write have one home.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

use crate::model::llama::{HostTensor, LayerWeight, WeightName, WeightSource};
use crate::model::safetensors::HfFolder;
use crate::model::{
    gguf::GgufWeights, GgufFile, LlamaConfig, ModelError, Precision, TokenizerSource,
};

use super::lora::{LoraAdapter, LoraConfig};
use super::model::{hf_name, projection_path, TrainLlama, PROJECTION_WEIGHTS};
use super::{io_err, TrainError};

/// File names inside a checkpoint folder.
pub const CONFIG: &str = "config.json";
/// Merged weights of a full checkpoint.
pub const WEIGHTS: &str = "model.safetensors";
/// PEFT adapter weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT adapter config.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// backflow's own metadata (version hash, step, base, hyper-parameters).
pub const META: &str = "backflow.json";
/// Resume state: step and counters.
pub const TRAINER_STATE: &str = "trainer_state.json";
/// Resume state: AdamW moments.
pub const OPTIMIZER: &str = "optimizer.bin";
/// Per-step metrics, carried over from one checkpoint to the next.
pub const METRICS: &str = "metrics.jsonl";

/// The PEFT prefix of adapter tensor names.
const PEFT_PREFIX: &str = "base_model.model.";

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<HostTensor, TrainError> {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| TrainError::Checkpoint(format!("tensor to host: {e:?}")))?;
    Ok(HostTensor { data, shape })
}

/// Every weight of `m` under its HF name, LoRA adapters merged in (`W + (α/r)·B·A`); no
/// `lm_head.weight` when the embedding is tied, as HF writes it.
pub fn export_weights<B: Backend>(
    m: &TrainLlama<B>,
) -> Result<Vec<(String, HostTensor)>, TrainError> {
    let device = m.norm.val().device();
    let mut out = vec![
        (
            hf_name(WeightName::Embedding),
            host(m.embed.weight(&device))?,
        ),
        (hf_name(WeightName::OutputNorm), host(m.norm.val())?),
    ];
    if let Some(h) = &m.lm_head {
        out.push((hf_name(WeightName::Output), host(h.weight(&device))?));
    }
    for (l, blk) in m.blocks.iter().enumerate() {
        let w = |lw| hf_name(WeightName::Layer(l, lw));
        out.push((w(LayerWeight::AttnNorm), host(blk.attn_norm.val())?));
        out.push((w(LayerWeight::FfnNorm), host(blk.ffn_norm.val())?));
        for lw in PROJECTION_WEIGHTS {
            let Some(lin) = blk.projection(lw) else {
                continue;
            };
            out.push((w(lw), host(lin.merged_weight(&device))?));
            let bias = match lw {
                LayerWeight::Q => Some(LayerWeight::QBias),
                LayerWeight::K => Some(LayerWeight::KBias),
                LayerWeight::V => Some(LayerWeight::VBias),
                _ => None,
            };
            if let (Some(bw), Some(b)) = (bias, &lin.bias) {
                out.push((w(bw), host(b.val())?));
            }
        }
    }
    Ok(out)
}

/// The LoRA tensors of `m` under PEFT's names
/// (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`).
pub fn export_adapter<B: Backend>(
    m: &TrainLlama<B>,
) -> Result<Vec<(String, HostTensor)>, TrainError> {
    let mut out = Vec::new();
    for (l, blk) in m.blocks.iter().enumerate() {
        for lw in PROJECTION_WEIGHTS {
            let (Some(lin), Some((path, _))) = (blk.projection(lw), projection_path(l, lw)) else {
                continue;
            };
            if let Some(lora) = &lin.lora {
                out.push((
                    format!("{PEFT_PREFIX}{path}.lora_A.weight"),
                    host(lora.a.val())?,
                ));
                out.push((
                    format!("{PEFT_PREFIX}{path}.lora_B.weight"),
                    host(lora.b.val())?,
                ));
            }
        }
    }
    Ok(out)
}

/// Serializes named f32 tensors as safetensors bytes (names sorted, as the format stores them).
pub fn safetensors_bytes(tensors: &[(String, HostTensor)]) -> Result<Vec<u8>, TrainError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.shape.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrainError::Checkpoint(format!("safetensors: {e}")))?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(views, Some(meta))
        .map_err(|e| TrainError::Checkpoint(format!("safetensors: {e}")))
}

/// The version of a checkpoint: xxh3-128 of its weight file, hex.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// A Hugging Face `config.json` for `cfg`.
pub fn hf_config(cfg: &LlamaConfig, bos: Option<u32>, eos: &[u32]) -> serde_json::Value {
    let (model_type, arch) = match cfg.arch {
        crate::model::Architecture::Llama => ("llama", "LlamaForCausalLM"),
        crate::model::Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
    };
    json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "rms_norm_eps": cfg.rms_eps,
        "vocab_size": cfg.vocab,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": false,
        "bos_token_id": bos,
        "eos_token_id": if eos.len() == 1 { json!(eos[0]) } else { json!(eos) },
        "torch_dtype": "float32",
    })
}

/// `config.json` (name, bytes) of an HF checkpoint of `cfg`: its end-of-sequence ids are the
/// tokenizer's and every stop token the model generates with (the end of a chat turn), so
/// transformers' `generate` stops where backflow does.
pub fn hf_config_file(
    cfg: &LlamaConfig,
    tokenizer: &crate::model::tokenizer::Tokenizer,
    stop_ids: &[u32],
) -> Result<(String, Vec<u8>), TrainError> {
    let eos: Vec<u32> = tokenizer
        .eos_id()
        .into_iter()
        .chain(stop_ids.iter().copied())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let config = hf_config(cfg, tokenizer.bos_id(), &eos);
    let bytes = serde_json::to_vec_pretty(&config)
        .map_err(|e| TrainError::Checkpoint(format!("config.json: {e}")))?;
    Ok((CONFIG.into(), bytes))
}

/// The tokenizer files of the output: the HF base's own, or written from the GGUF vocabulary.
pub fn tokenizer_files(src: &TokenizerSource) -> Result<Vec<(String, Vec<u8>)>, TrainError> {
    Ok(match src {
        TokenizerSource::Gguf(meta) => match super::tokenizer_json::from_gguf(meta) {
            Ok((tj, tc)) => vec![
                ("tokenizer.json".into(), tj.into_bytes()),
                ("tokenizer_config.json".into(), tc.into_bytes()),
            ],
            Err(e) => {
                log::warn!("checkpoint without tokenizer.json: {e}");
                Vec::new()
            }
        },
        TokenizerSource::TokenizerJson(p) => {
            let mut v = vec![(
                "tokenizer.json".into(),
                std::fs::read(p).map_err(io_err(p))?,
            )];
            let cfg = p.with_file_name("tokenizer_config.json");
            if cfg.exists() {
                v.push((
                    "tokenizer_config.json".into(),
                    std::fs::read(&cfg).map_err(io_err(&cfg))?,
                ));
            }
            v
        }
        TokenizerSource::Missing => Vec::new(),
    })
}

/// A PEFT `adapter_config.json`.
pub fn adapter_config(lc: &LoraConfig, base: &Path) -> serde_json::Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.to_string_lossy(),
        "r": lc.rank,
        "lora_alpha": lc.alpha,
        "lora_dropout": lc.dropout,
        "target_modules": lc.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "use_rslora": false,
        "modules_to_save": null,
    })
}

/// Writes `files` (name, bytes) as folder `dest`, atomically: into a sibling temporary folder,
/// then renamed over `dest`. Files named in `carry` are copied from the old `dest` when the new
/// set lacks them (the metrics log).
pub fn write_folder_atomic(
    dest: &Path,
    files: &[(String, Vec<u8>)],
    carry: &[&str],
) -> Result<(), TrainError> {
    let name = dest
        .file_name()
        .ok_or_else(|| TrainError::Checkpoint(format!("bad output folder {}", dest.display())))?
        .to_string_lossy()
        .to_string();
    let parent = dest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let parent = if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    for (n, bytes) in files {
        let p = tmp.join(n);
        std::fs::write(&p, bytes).map_err(io_err(&p))?;
    }
    for c in carry {
        let (from, to) = (dest.join(c), tmp.join(c));
        if from.exists() && !to.exists() {
            std::fs::copy(&from, &to).map_err(io_err(&from))?;
        }
    }
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(io_err(dest))?;
    }
    std::fs::rename(&tmp, dest).map_err(io_err(&tmp))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

/// A base model opened for reading weights: a GGUF file or an HF folder.
pub enum BaseModel {
    /// A GGUF file.
    Gguf(Box<GgufFile>, LlamaConfig),
    /// A Hugging Face folder.
    Hf(Box<HfFolder>),
}

impl BaseModel {
    /// Opens `path` (a `.gguf` file or an HF folder).
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        if path.is_dir() {
            return Ok(BaseModel::Hf(Box::new(HfFolder::open(path)?)));
        }
        let file = GgufFile::open(path).map_err(ModelError::from)?;
        let cfg = LlamaConfig::from_gguf(&file)?;
        Ok(BaseModel::Gguf(Box::new(file), cfg))
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        match self {
            BaseModel::Gguf(_, c) => c,
            BaseModel::Hf(h) => &h.config,
        }
    }

    /// Runs `f` with the weight source.
    pub fn with_source<T>(&mut self, f: impl FnOnce(&mut dyn WeightSource) -> T) -> T {
        match self {
            BaseModel::Gguf(file, cfg) => f(&mut GgufWeights::new(file, cfg)),
            BaseModel::Hf(h) => f(h.as_mut()),
        }
    }

    /// The tokenizer data and stop ids, as `load_checkpoint` finds them.
    pub fn tokenizer(&self) -> (TokenizerSource, Vec<u32>) {
        match self {
            BaseModel::Hf(h) => (
                h.tokenizer_json()
                    .map(TokenizerSource::TokenizerJson)
                    .unwrap_or(TokenizerSource::Missing),
                h.eos_ids(),
            ),
            BaseModel::Gguf(file, _) => match file.tokenizer_meta() {
                Ok(meta) => {
                    let mut stops: Vec<u32> = meta.eos_id.into_iter().collect();
                    // The end-of-turn tokens load_checkpoint also stops at.
                    for (id, tok) in meta.tokens.iter().enumerate() {
                        if [
                            "<|im_end|>",
                            "<|eot_id|>",
                            "<|endoftext|>",
                            "<|end|>",
                            "</s>",
                        ]
                        .contains(&tok.as_str())
                            && !stops.contains(&(id as u32))
                        {
                            stops.push(id as u32);
                        }
                    }
                    (TokenizerSource::Gguf(Box::new(meta)), stops)
                }
                Err(_) => (TokenizerSource::Missing, Vec::new()),
            },
        }
    }
}

/// A PEFT adapter folder, read.
#[derive(Debug)]
pub struct Adapter {
    /// The base model path from `adapter_config.json`.
    pub base: PathBuf,
    /// LoRA hyper-parameters.
    pub config: LoraConfig,
    /// `(layer, projection) -> (A [r, in], B [out, r])`.
    pub tensors: HashMap<(usize, usize), (HostTensor, HostTensor)>,
}

/// Whether `dir` is a PEFT adapter folder.
pub fn is_adapter(dir: &Path) -> bool {
    dir.is_dir() && dir.join(ADAPTER_CONFIG).exists()
}

impl Adapter {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`. A relative base
    /// path is resolved against `dir`.
    pub fn read(dir: &Path) -> Result<Adapter, TrainError> {
        let cp = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cp).map_err(io_err(&cp))?;
        let j: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", cp.display())))?;
        let bad = |m: &str| TrainError::Checkpoint(format!("{}: {m}", cp.display()));
        let base = j["base_model_name_or_path"]
            .as_str()
            .ok_or_else(|| bad("no base_model_name_or_path"))?;
        let base = if Path::new(base).is_absolute() {
            PathBuf::from(base)
        } else {
            dir.join(base)
        };
        let rank = j["r"]
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("no rank r"))? as usize;
        let config = LoraConfig {
            rank,
            alpha: j["lora_alpha"].as_f64().unwrap_or(rank as f64),
            dropout: j["lora_dropout"].as_f64().unwrap_or(0.0),
            target_modules: j["target_modules"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let wp = dir.join(ADAPTER_WEIGHTS);
        let bytes = std::fs::read(&wp).map_err(io_err(&wp))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", wp.display())))?;
        let mut a_b: HashMap<(usize, usize), (Option<HostTensor>, Option<HostTensor>)> =
            HashMap::new();
        for (name, view) in st.tensors() {
            let Some(rest) = name
                .strip_prefix(PEFT_PREFIX)
                .and_then(|r| r.strip_prefix("model.layers."))
            else {
                return Err(TrainError::Checkpoint(format!(
                    "unexpected adapter tensor {name}"
                )));
            };
            let (layer, rest) = rest
                .split_once('.')
                .ok_or_else(|| bad(&format!("bad tensor name {name}")))?;
            let layer: usize = layer
                .parse()
                .map_err(|_| bad(&format!("bad layer in {name}")))?;
            let (proj, which) = if let Some(p) = rest.strip_suffix(".lora_A.weight") {
                (p, 0)
            } else if let Some(p) = rest.strip_suffix(".lora_B.weight") {
                (p, 1)
            } else {
                return Err(bad(&format!("unexpected adapter tensor {name}")));
            };
            let pi = PROJECTION_WEIGHTS
                .iter()
                .position(|&lw| {
                    projection_path(layer, lw).map(|(p, _)| p)
                        == Some(format!("model.layers.{layer}.{proj}"))
                })
                .ok_or_else(|| bad(&format!("unknown projection in {name}")))?;
            if view.dtype() != Dtype::F32 {
                return Err(bad(&format!("{name}: dtype {:?} (only F32)", view.dtype())));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let t = HostTensor {
                data,
                shape: view.shape().to_vec(),
            };
            let slot = a_b.entry((layer, pi)).or_default();
            if which == 0 {
                slot.0 = Some(t)
            } else {
                slot.1 = Some(t)
            }
        }
        let mut tensors = HashMap::new();
        for (k, (a, b)) in a_b {
            match (a, b) {
                (Some(a), Some(b))
                    if a.shape.len() == 2
                        && b.shape.len() == 2
                        && a.shape[0] == rank
                        && b.shape[1] == rank =>
                {
                    tensors.insert(k, (a, b));
                }
                _ => {
                    return Err(bad(&format!(
                        "layer {} projection {}: incomplete or mis-shaped A/B",
                        k.0, k.1
                    )))
                }
            }
        }
        Ok(Adapter {
            base,
            config,
            tensors,
        })
    }

    /// Attaches the adapters to a model loaded in LoRA mode (for resuming training).
    pub fn attach<B: Backend>(
        &self,
        m: &mut TrainLlama<B>,
        device: &B::Device,
    ) -> Result<(), TrainError> {
        for (&(l, pi), (a, b)) in &self.tensors {
            let lw = PROJECTION_WEIGHTS[pi];
            let (path, _) = projection_path(l, lw)
                .ok_or_else(|| TrainError::Checkpoint("bad projection".into()))?;
            let ta = Tensor::from_data(
                burn::tensor::TensorData::new(a.data.clone(), [a.shape[0], a.shape[1]]),
                device,
            );
            let tb = Tensor::from_data(
                burn::tensor::TensorData::new(b.data.clone(), [b.shape[0], b.shape[1]]),
                device,
            );
            m.set_adapter(
                l,
                lw,
                LoraAdapter::from_tensors(&path, ta, tb, &self.config),
            )?;
        }
        Ok(())
    }
}

/// A weight source that folds an adapter into its base's projections on the host.
pub(crate) struct Merged<'a> {
    /// The base's weights.
    pub(crate) base: &'a mut dyn WeightSource,
    /// The adapter merged into them.
    pub(crate) adapter: &'a Adapter,
}

impl WeightSource for Merged<'_> {
    fn load(&mut self, name: WeightName) -> Result<Option<HostTensor>, ModelError> {
        let mut t = self.base.load(name)?;
        if let (WeightName::Layer(l, lw), Some(w)) = (name, t.as_mut()) {
            if let Some(pi) = PROJECTION_WEIGHTS.iter().position(|&p| p == lw) {
                if let Some((a, b)) = self.adapter.tensors.get(&(l, pi)) {
                    let (out, r, inp) = (b.shape[0], a.shape[0], a.shape[1]);
                    if w.shape != [out, inp] {
                        return Err(ModelError::Weight {
                            name: hf_name(name),
                            problem: format!("adapter is {out}x{inp}, weight {:?}", w.shape),
                        });
                    }
                    let s = self.adapter.config.scale() as f32;
                    for o in 0..out {
                        let row = &mut w.data[o * inp..(o + 1) * inp];
                        for k in 0..r {
                            let c = s * b.data[o * r + k];
                            if c != 0.0 {
                                for (x, av) in row.iter_mut().zip(&a.data[k * inp..(k + 1) * inp]) {
                                    *x += c * av;
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(t)
    }
}

/// Loads a GGUF file, an HF folder, or a LoRA adapter folder as the training model with every
/// weight frozen, with its tokenizer: for losses computed exactly as training computes them
/// (`train::sft::eval_loss`), e.g. the likelihood of reference answers in `backflow eval`.
///
/// The model is held as LoRA training holds it: a GGUF base keeps its projections in the
/// file's own blocks, dequantized for each product, an HF base is read in f32, and an adapter
/// stays unmerged over either. So the loss is the one training reports, and a GGUF model
/// takes about its file's size instead of an f32 copy (the 1.5B Qwen as f32 is ~7 GB).
pub fn load_for_loss<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(TrainLlama<B>, TokenizerSource), TrainError> {
    use super::model::TrainMode;
    let adapter = if is_adapter(path) {
        Some(Adapter::read(path)?)
    } else {
        None
    };
    let mut base = BaseModel::open(adapter.as_ref().map_or(path, |a| a.base.as_path()))?;
    let in_blocks = matches!(base, BaseModel::Gguf(..));
    // LoRA mode freezes the base; with no target it adds no adapter of its own.
    let lora = adapter.as_ref().map_or_else(
        || LoraConfig {
            target_modules: Vec::new(),
            ..LoraConfig::all_projections(1)
        },
        |a| a.config.clone(),
    );
    let precision = if in_blocks {
        Precision::Native
    } else {
        Precision::F32
    };
    let cfg = base.config().clone();
    let mut model = base.with_source(|src| {
        TrainLlama::load_with_base(cfg, src, &TrainMode::Lora(lora), precision, device)
    })?;
    let mut tokenizer = base.tokenizer().0;
    if let Some(a) = &adapter {
        a.attach(&mut model, device)?;
        let own = path.join("tokenizer.json");
        if own.exists() {
            tokenizer = TokenizerSource::TokenizerJson(own);
        }
    }
    Ok((model, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::RandomWeights;
    use crate::model::{Llama, Precision};
    use crate::train::model::TrainMode;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Int, TensorData};

    use crate::train::tiny_config as cfg;

    /// Last-position logits of the inference model (its own forward, KV cache and all).
    fn inference_logits(m: &Llama<Flex>, ids: &[u32]) -> Vec<f32> {
        let toks: Vec<Option<u32>> = ids.iter().map(|&t| Some(t)).collect();
        let mut cache = m.new_cache(1, ids.len());
        m.forward(&toks, ids.len(), &mut cache)
            .expect("forward")
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
    }

    fn train_logits(m: &TrainLlama<Flex>, ids: &[u32]) -> Vec<f32> {
        let s = ids.len();
        let t = Tensor::<Flex, 2, Int>::from_data(
            TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, s]),
            &Default::default(),
        );
        m.forward(t)
            .narrow(0, s - 1, 1)
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
    }

    fn assert_close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "max |diff| {worst}");
    }

    #[test]
    fn full_and_adapter_checkpoints_reload_with_the_same_logits() {
        let dev = Default::default();
        let c = cfg();
        Flex::seed(&dev, 4);
        let mut m: TrainLlama<Flex> = TrainLlama::load(
            c.clone(),
            &mut RandomWeights::new(c.clone(), 8),
            &TrainMode::Lora(LoraConfig::all_projections(4)),
            &dev,
        )
        .expect("load");
        // Non-zero B so the adapter changes the outputs.
        for blk in &mut m.blocks {
            for lin in [&mut blk.q, &mut blk.v, &mut blk.down] {
                if let Some(l) = lin.lora.as_mut() {
                    let shape = l.b.val().dims();
                    l.b = crate::train::lora::param(
                        "b",
                        Tensor::random(shape, Distribution::Uniform(-0.3, 0.3), &dev),
                        true,
                    );
                }
            }
        }
        let ids = [3u32, 17, 42, 5, 9, 60, 1];
        let want = train_logits(&m, &ids);

        // Full: HF folder with merged weights, read by the inference loader.
        let root = tempfile::tempdir().expect("tmp");
        let full = root.path().join("full");
        let bytes = safetensors_bytes(&export_weights(&m).expect("export")).expect("st");
        let config = serde_json::to_vec(&hf_config(&c, None, &[1])).expect("json");
        write_folder_atomic(
            &full,
            &[(CONFIG.into(), config), (WEIGHTS.into(), bytes)],
            &[],
        )
        .expect("write");
        let ck = crate::train::load::load_for_inference::<Flex>(&full, &dev, Precision::F32)
            .expect("reload full");
        assert_close(&inference_logits(&ck.model, &ids), &want);

        // Adapter: PEFT folder over a base HF folder (the un-adapted weights).
        let base = root.path().join("base");
        let base_model: TrainLlama<Flex> = TrainLlama::load(
            c.clone(),
            &mut RandomWeights::new(c.clone(), 8),
            &TrainMode::Full,
            &dev,
        )
        .expect("load");
        let bytes = safetensors_bytes(&export_weights(&base_model).expect("export")).expect("st");
        let config = serde_json::to_vec(&hf_config(&c, None, &[1])).expect("json");
        write_folder_atomic(
            &base,
            &[(CONFIG.into(), config), (WEIGHTS.into(), bytes)],
            &[],
        )
        .expect("write");
        let ad = root.path().join("adapter");
        let lc = LoraConfig::all_projections(4);
        let files = vec![
            (
                ADAPTER_CONFIG.to_string(),
                serde_json::to_vec(&adapter_config(&lc, &base)).expect("json"),
            ),
            (
                ADAPTER_WEIGHTS.to_string(),
                safetensors_bytes(&export_adapter(&m).expect("export")).expect("st"),
            ),
        ];
        write_folder_atomic(&ad, &files, &[]).expect("write");
        assert!(is_adapter(&ad));
        let ck = crate::train::load::load_for_inference::<Flex>(&ad, &dev, Precision::F32)
            .expect("reload adapter");
        assert_close(&inference_logits(&ck.model, &ids), &want);
        // And the base alone differs (the adapter mattered).
        let plain = crate::train::load::load_for_inference::<Flex>(&base, &dev, Precision::F32)
            .expect("base");
        let diff = inference_logits(&plain.model, &ids)
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff > 1e-3, "adapter made no difference");
        // As the loss sees them: the full folder, and the adapter unmerged over its HF base.
        for folder in [&full, &ad] {
            let (lm, _) = load_for_loss::<Flex>(folder, &dev).expect("load for the loss");
            assert_close(&train_logits(&lm, &ids), &want);
        }
        // Re-writing a folder replaces it whole.
        write_folder_atomic(&ad, &[("x".into(), vec![1])], &[]).expect("rewrite");
        assert!(!ad.join(ADAPTER_CONFIG).exists() && ad.join("x").exists());
    }
}
