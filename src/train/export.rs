//! Export to the Hugging Face layout: any model backflow loads (a GGUF file, an HF folder, or a
//! LoRA adapter folder merged onto its base) written as `config.json`, `model.safetensors`
//! (f32), `tokenizer.json` and `tokenizer_config.json`, the folder transformers, PEFT (as the
//! base of an adapter) and llama.cpp's converter read.
//!
//! Why it exists: an adapter trained on a GGUF base names that `.gguf` as its
//! `base_model_name_or_path`, and PEFT only takes an HF model as a base. Exporting the GGUF
//! once gives PEFT its base; exporting the adapter folder gives the merged model.

use std::path::{Path, PathBuf};

use crate::model::llama::{HostTensor, WeightName, WeightSource};
use crate::model::{LlamaConfig, ModelError, TokenizerSource};

use super::checkpoint::{self, Adapter, BaseModel, Merged};
use super::model::hf_name;
use super::save::CheckpointMeta;
use super::{io_err, TrainError};

/// What [`export_hf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// The folder written.
    pub out: PathBuf,
    /// Content hash of `model.safetensors` (the same version a full checkpoint would carry).
    pub version: String,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of `model.safetensors`.
    pub weight_bytes: usize,
    /// Whether an adapter was merged onto its base.
    pub merged_adapter: bool,
}

/// What an export reads: the adapter (when `model` is an adapter folder), the base it goes
/// onto (or the model itself), its config and its tokenizer.
pub(crate) struct ExportSource {
    /// The adapter, merged onto `base` as the weights are read.
    pub adapter: Option<Adapter>,
    /// The base model (the model itself when there is no adapter).
    pub base: BaseModel,
    /// The hyper-parameters.
    pub cfg: LlamaConfig,
    /// The tokenizer: the adapter folder's own copy when it has one, else the base's.
    pub tokenizer: TokenizerSource,
    /// The base's stop ids.
    pub stop_ids: Vec<u32>,
}

impl ExportSource {
    /// Opens `model` (GGUF file, HF folder, or adapter folder).
    pub(crate) fn open(model: &Path) -> Result<Self, TrainError> {
        let adapter = if checkpoint::is_adapter(model) {
            Some(Adapter::read(model)?)
        } else {
            None
        };
        let base_path = adapter
            .as_ref()
            .map_or_else(|| model.to_path_buf(), |a| a.base.clone());
        let base = BaseModel::open(&base_path)?;
        let cfg = base.config().clone();
        let (mut tokenizer, stop_ids) = base.tokenizer();
        // An adapter folder carries its own copy of the tokenizer (as load_for_inference uses).
        let own = model.join("tokenizer.json");
        if adapter.is_some() && own.exists() {
            tokenizer = TokenizerSource::TokenizerJson(own);
        }
        Ok(ExportSource {
            adapter,
            base,
            cfg,
            tokenizer,
            stop_ids,
        })
    }
}

/// Writes `model` (GGUF file, HF folder, or adapter folder) as an HF folder at `out`,
/// atomically (see [`checkpoint::write_folder_atomic`]). Q/K rows come out in HF's "halves"
/// RoPE order whatever the source (GGUF stores them permuted); a tied head is left out, as HF
/// writes it.
pub fn export_hf(model: &Path, out: &Path) -> Result<Exported, TrainError> {
    let ExportSource {
        adapter,
        mut base,
        cfg,
        tokenizer: tok_src,
        stop_ids,
    } = ExportSource::open(model)?;
    let tokenizer = tok_src.load()?;
    let tensors = base.with_source(|src| match &adapter {
        Some(a) => read_all(
            &cfg,
            &mut Merged {
                base: src,
                adapter: a,
            },
        ),
        None => read_all(&cfg, src),
    })?;
    let weights = checkpoint::safetensors_bytes(&tensors)?;
    let version = checkpoint::content_hash(&weights);
    let source = std::fs::canonicalize(model).map_err(io_err(model))?;
    let meta = CheckpointMeta {
        version: Some(version.clone()),
        kind: "export".into(),
        base_model: adapter.as_ref().map(|a| a.base.clone()),
        exported_from: Some(source),
        merged_adapter: Some(adapter.is_some()),
        finished: true,
        ..CheckpointMeta::default()
    };
    let exported = Exported {
        out: out.to_path_buf(),
        version,
        tensors: tensors.len(),
        weight_bytes: weights.len(),
        merged_adapter: adapter.is_some(),
    };
    let mut files = checkpoint::tokenizer_files(&tok_src)?;
    files.push(checkpoint::hf_config_file(&cfg, &tokenizer, &stop_ids)?);
    files.push((checkpoint::WEIGHTS.into(), weights));
    files.push((
        checkpoint::META.into(),
        serde_json::to_vec_pretty(&meta)
            .map_err(|e| TrainError::Checkpoint(format!("backflow.json: {e}")))?,
    ));
    checkpoint::write_folder_atomic(out, &files, &[])?;
    Ok(exported)
}

/// Every weight the model of `cfg` reads from `src` ([`WeightName::all`]), under its HF name.
fn read_all(
    cfg: &LlamaConfig,
    src: &mut dyn WeightSource,
) -> Result<Vec<(String, HostTensor)>, ModelError> {
    WeightName::all(cfg)
        .into_iter()
        .map(|name| {
            let t = src.load(name)?.ok_or_else(|| ModelError::Weight {
                name: hf_name(name),
                problem: "missing from the checkpoint".into(),
            })?;
            Ok((hf_name(name), t))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{LayerWeight, RandomWeights};
    use crate::train::tiny_config;

    #[test]
    fn every_weight_is_read_once_under_its_hf_name() {
        let cfg = tiny_config();
        let mut src = RandomWeights::new(cfg.clone(), 3);
        let got = read_all(&cfg, &mut src).expect("read");
        let names: std::collections::BTreeSet<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), got.len(), "a name written twice");
        // HF's names, spelled out here rather than produced by hf_name.
        for n in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ] {
            assert!(names.contains(n), "{n} missing from {names:?}");
        }
        let per_layer = 9;
        let head = usize::from(!cfg.tie_embeddings);
        assert_eq!(got.len(), 2 + head + per_layer * cfg.n_layers);
    }

    /// A trained adapter exported merged reloads as a plain HF folder with the adapter's
    /// logits, and its tokenizer and config come along.
    #[test]
    fn an_exported_adapter_loads_as_the_merged_model() {
        use crate::train::{data::DataSource, lora::LoraConfig, model::TrainMode};
        use crate::train::{run_job, DataGroup, TrainJob};
        use burn::backend::Flex;

        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base");
        crate::train::tiny_base(&base);
        let pair = |i: &str, o: &str| crate::train::data::Record::Pair {
            instruction: i.into(),
            output: o.into(),
        };
        let adapter = root.path().join("adapter");
        let job = TrainJob {
            mode: TrainMode::Lora(LoraConfig::all_projections(4)),
            lr: Some(5e-2),
            batch_size: 2,
            steps: Some(3),
            max_len: 128,
            ..TrainJob::new(
                base.clone(),
                vec![DataGroup {
                    source: DataSource::Seed,
                    records: vec![
                        pair("what is ice?", "frozen water."),
                        pair("say hi.", "hi."),
                    ],
                }],
                adapter.clone(),
            )
        };
        run_job(&job).expect("train");
        let merged = root.path().join("merged");
        let done = export_hf(&adapter, &merged).expect("export");
        assert!(done.merged_adapter);
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "backflow.json",
        ] {
            assert!(merged.join(f).exists(), "{f} not written");
        }
        assert!(!checkpoint::is_adapter(&merged));

        let dev = Default::default();
        let logits = |path: &Path| -> Vec<f32> {
            let ck = crate::train::load::load_for_inference::<Flex>(
                path,
                &dev,
                crate::model::Precision::F32,
            )
            .expect("load");
            let ids = [3u32, 1, 4, 1, 5];
            let toks: Vec<Option<u32>> = ids.iter().map(|&t| Some(t)).collect();
            let mut cache = ck.model.new_cache(1, ids.len());
            ck.model
                .forward(&toks, ids.len(), &mut cache)
                .expect("forward")
                .into_data()
                .to_vec::<f32>()
                .expect("logits")
        };
        let (want, got, plain) = (logits(&adapter), logits(&merged), logits(&base));
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert_eq!(want.len(), got.len());
        assert!(
            diff(&want, &got) < 1e-5,
            "merged export differs from the adapter"
        );
        assert!(
            diff(&want, &plain) > 1e-4,
            "the adapter did not change the model"
        );
        // The same adapter exported as GGUF: the merged weights, in llama.cpp's layout.
        let gguf = root.path().join("merged.gguf");
        let done = crate::train::export_gguf::export_gguf(
            &adapter,
            &gguf,
            crate::train::export_gguf::GgufOutType::F32,
        )
        .expect("export gguf");
        assert!(done.merged_adapter);
        assert!(
            diff(&want, &logits(&gguf)) < 1e-4,
            "GGUF export differs from the adapter"
        );
    }

    /// A source that lacks one weight.
    struct Without(RandomWeights, WeightName);

    impl WeightSource for Without {
        fn load(&mut self, name: WeightName) -> Result<Option<HostTensor>, ModelError> {
            if name == self.1 {
                return Ok(None);
            }
            self.0.load(name)
        }
    }

    #[test]
    fn a_missing_weight_is_an_error_naming_it() {
        let cfg = tiny_config();
        let gone = WeightName::Layer(1, LayerWeight::Up);
        let mut src = Without(RandomWeights::new(cfg.clone(), 3), gone);
        let err = read_all(&cfg, &mut src).expect_err("missing weight");
        assert!(
            err.to_string()
                .contains("model.layers.1.mlp.up_proj.weight"),
            "{err}"
        );
    }
}
