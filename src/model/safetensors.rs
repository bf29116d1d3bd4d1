//! Hugging Face checkpoint folders: `config.json`, `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, and `tokenizer.json` (read by the tokenizer module).
//! Weights may be `f32`, `f16` or `bf16`; they are converted to `f32`.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::config::LlamaConfig;
use super::llama::{HostTensor, LayerWeight, WeightName, WeightSource};
use super::ModelError;

/// A Hugging Face checkpoint folder, its safetensors files mapped.
pub struct HfFolder {
    dir: PathBuf,
    /// The parsed `config.json`.
    pub config: LlamaConfig,
    /// The raw `config.json` (for `eos_token_id` and other fields the model does not need).
    pub config_json: serde_json::Value,
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name -> index in `files`.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for HfFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfFolder")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.index.len())
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Safetensors(format!("{}: {e}", path.display()))
}

impl HfFolder {
    /// Opens a folder with `config.json` and `model.safetensors` (or a sharded index).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_path_buf();
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
        let config = LlamaConfig::from_hf_json(&text)?;
        let config_json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;

        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if single.exists() {
            vec!["model.safetensors".into()]
        } else if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let j: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| st_err(&index_path, e))?;
            let map = j
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| st_err(&index_path, "no weight_map"))?;
            // Only the shard names matter: each shard's own header says what it holds.
            let names: BTreeSet<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            names.into_iter().collect()
        } else {
            return Err(ModelError::Safetensors(format!(
                "{}: neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )));
        };

        let mut files = Vec::new();
        let mut index = HashMap::new();
        for name in shard_names {
            // Shard names come from a file we do not control: keep them inside the folder.
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                return Err(st_err(&index_path, format!("bad shard name {name:?}")));
            }
            let path = dir.join(&name);
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: read-only mapping of a checkpoint file (see GgufFile::open).
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| st_err(&path, e))?;
            for t in st.names() {
                index.insert(t.to_string(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(HfFolder {
            dir,
            config,
            config_json,
            files,
            index,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `tokenizer.json` in the folder, if present.
    pub fn tokenizer_json(&self) -> Option<PathBuf> {
        let p = self.dir.join("tokenizer.json");
        p.exists().then_some(p)
    }

    /// `eos_token_id` of `config.json` (a number or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        match self.config_json.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| v as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A tensor by its checkpoint name, converted to `f32`; `None` when absent.
    pub fn tensor_f32(&self, name: &str) -> Result<Option<HostTensor>, ModelError> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| st_err(path, e))?;
        let view = st.tensor(name).map_err(|e| st_err(path, e))?;
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::Weight {
                    name: name.to_string(),
                    problem: format!("unsupported dtype {other:?} (f32, f16, bf16 are)"),
                })
            }
        };
        Ok(Some(HostTensor {
            data,
            shape: view.shape().to_vec(),
        }))
    }

    /// The Hugging Face name of a weight.
    pub fn name(name: WeightName) -> String {
        match name {
            WeightName::Embedding => "model.embed_tokens.weight".into(),
            WeightName::OutputNorm => "model.norm.weight".into(),
            WeightName::Output => "lm_head.weight".into(),
            WeightName::Layer(l, w) => {
                format!("model.layers.{l}.{}", hf_layer_suffix(w))
            }
        }
    }
}

impl WeightSource for HfFolder {
    fn load(&mut self, name: WeightName) -> Result<Option<HostTensor>, ModelError> {
        // HF llama checkpoints are already in "halves" RoPE order: nothing to permute.
        self.tensor_f32(&Self::name(name))
    }
}

/// The Hugging Face name of a block weight, below `model.layers.{i}.`.
pub fn hf_layer_suffix(w: LayerWeight) -> &'static str {
    match w {
        LayerWeight::AttnNorm => "input_layernorm.weight",
        LayerWeight::Q => "self_attn.q_proj.weight",
        LayerWeight::K => "self_attn.k_proj.weight",
        LayerWeight::V => "self_attn.v_proj.weight",
        LayerWeight::QBias => "self_attn.q_proj.bias",
        LayerWeight::KBias => "self_attn.k_proj.bias",
        LayerWeight::VBias => "self_attn.v_proj.bias",
        LayerWeight::O => "self_attn.o_proj.weight",
        LayerWeight::FfnNorm => "post_attention_layernorm.weight",
        LayerWeight::Gate => "mlp.gate_proj.weight",
        LayerWeight::Up => "mlp.up_proj.weight",
        LayerWeight::Down => "mlp.down_proj.weight",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    #[test]
    fn reads_f32_f16_bf16_from_shards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = r#"{"model_type":"llama","hidden_size":4,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":3,"eos_token_id":[2,5]}"#;
        std::fs::write(dir.path().join("config.json"), cfg).expect("write");
        let f32_bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f16_bytes: Vec<u8> = [0.5f32, 3.0]
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16_bytes: Vec<u8> = [-0.25f32, 8.0]
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        let a = TensorView::new(Dtype::F32, vec![2], &f32_bytes).expect("view");
        let b = TensorView::new(Dtype::F16, vec![1, 2], &f16_bytes).expect("view");
        let c = TensorView::new(Dtype::BF16, vec![2, 1], &bf16_bytes).expect("view");
        let shard1 = safetensors::serialize([("model.norm.weight", a)], None).expect("ser");
        let shard2 = safetensors::serialize([("lm_head.weight", b), ("x", c)], None).expect("ser");
        std::fs::write(dir.path().join("model-00001-of-00002.safetensors"), shard1).expect("w");
        std::fs::write(dir.path().join("model-00002-of-00002.safetensors"), shard2).expect("w");
        let index = r#"{"weight_map":{"model.norm.weight":"model-00001-of-00002.safetensors",
            "lm_head.weight":"model-00002-of-00002.safetensors","x":"model-00002-of-00002.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).expect("w");

        let mut hf = HfFolder::open(dir.path()).expect("open");
        assert_eq!(hf.eos_ids(), vec![2, 5]);
        let n = hf
            .load(WeightName::OutputNorm)
            .expect("load")
            .expect("present");
        assert_eq!(n.data, vec![1.5, -2.0]);
        let o = hf.load(WeightName::Output).expect("load").expect("present");
        assert_eq!((o.data, o.shape), (vec![0.5, 3.0], vec![1, 2]));
        let x = hf.tensor_f32("x").expect("load").expect("present");
        assert_eq!(x.data, vec![-0.25, 8.0]);
        assert!(hf.load(WeightName::Embedding).expect("load").is_none());
    }

    #[test]
    fn missing_weights_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = r#"{"model_type":"llama","hidden_size":4,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":3}"#;
        std::fs::write(dir.path().join("config.json"), cfg).expect("write");
        assert!(matches!(
            HfFolder::open(dir.path()),
            Err(ModelError::Safetensors(_))
        ));
    }
}
