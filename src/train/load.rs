//! Checkpoints loaded for inference (the model server, `generate`): a GGUF file, an HF folder,
//! or a PEFT adapter folder over the base named in its `adapter_config.json`.
//!
//! An adapter is applied unmerged ([`Llama::with_low_rank`]): the model it makes shares every
//! weight of its base, so the versions a Humpback run trains (M_yx, M_0, M_1, ...: adapters
//! over one base) cost their adapters, not a copy of the model each, and a base kept in a block
//! format ([`Precision::Native`], [`Precision::Q8`]) keeps its blocks exact instead of being
//! requantized with the update folded in. [`InferenceLoader`] loads each base once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use burn::tensor::backend::Backend;

use crate::model::llama::{LayerWeight, LowRank};
use crate::model::{Checkpoint, Llama, Precision, TokenizerSource};

use super::checkpoint::{is_adapter, Adapter};
use super::model::PROJECTION_WEIGHTS;
use super::TrainError;

/// Loads a GGUF file, an HF folder, or a LoRA adapter folder (over its base, unmerged) for
/// inference, in `precision`. The adapter folder's own `tokenizer.json` is used when present.
pub fn load_for_inference<B: Backend>(
    path: &Path,
    device: &B::Device,
    precision: Precision,
) -> Result<Checkpoint<B>, TrainError> {
    InferenceLoader::new(device.clone(), precision).load(path)
}

/// Loads checkpoints for inference, each base model once: a model file or folder loaded again
/// (unchanged on disk), or named as the base of an adapter, shares the weights loaded first.
pub struct InferenceLoader<B: Backend> {
    device: B::Device,
    precision: Precision,
    /// Every model file or folder loaded so far, by what identifies its content on disk.
    loaded: HashMap<FileIdentity, Checkpoint<B>>,
}

impl<B: Backend> InferenceLoader<B> {
    /// A loader that puts models on `device` in `precision`.
    pub fn new(device: B::Device, precision: Precision) -> Self {
        InferenceLoader {
            device,
            precision,
            loaded: HashMap::new(),
        }
    }

    /// The checkpoint at `path`: a model (loaded, or shared with an earlier load of the same
    /// unchanged file) or an adapter applied unmerged over its base.
    pub fn load(&mut self, path: &Path) -> Result<Checkpoint<B>, TrainError> {
        if !is_adapter(path) {
            return self.model(path);
        }
        let adapter = Adapter::read(path)?;
        let base = self.model(&adapter.base)?;
        let model: Llama<B> = base
            .model
            .with_low_rank(|layer, role| adapter.low_rank(layer, role))?;
        let own = path.join("tokenizer.json");
        let tokenizer = if own.exists() {
            TokenizerSource::TokenizerJson(own)
        } else {
            base.tokenizer
        };
        Ok(Checkpoint {
            model,
            tokenizer,
            stop_ids: base.stop_ids,
        })
    }

    fn model(&mut self, path: &Path) -> Result<Checkpoint<B>, TrainError> {
        let key = FileIdentity::of(path);
        if let Some(ck) = self.loaded.get(&key) {
            return Ok(ck.clone());
        }
        let ck = crate::model::load_checkpoint(path, &self.device, self.precision)?;
        self.loaded.insert(key, ck.clone());
        Ok(ck)
    }
}

impl Adapter {
    /// The update of projection `role` of `layer`, if the adapter has one.
    pub fn low_rank(&self, layer: usize, role: LayerWeight) -> Option<LowRank<'_>> {
        let pi = PROJECTION_WEIGHTS.iter().position(|&p| p == role)?;
        let (a, b) = self.tensors.get(&(layer, pi))?;
        Some(LowRank {
            a,
            b,
            scale: self.config.scale() as f32,
        })
    }
}

/// A model file or folder as it is on disk: its canonical path, and the sizes and modification
/// times of the file (or of a folder's files), so a checkpoint rewritten in place is loaded
/// again rather than taken for the one loaded before.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileIdentity {
    path: PathBuf,
    files: Vec<(PathBuf, u64, Option<SystemTime>)>,
}

impl FileIdentity {
    fn of(path: &Path) -> FileIdentity {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let stat = |p: &Path| {
            let meta = std::fs::metadata(p).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            (p.to_path_buf(), len, meta.and_then(|m| m.modified().ok()))
        };
        let mut files = Vec::new();
        if path.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                files.extend(entries.flatten().map(|e| stat(&e.path())));
            }
            files.sort();
        } else {
            files.push(stat(&path));
        }
        FileIdentity { path, files }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::RandomWeights;
    use crate::train::checkpoint::{
        adapter_config, export_adapter, export_weights, hf_config, safetensors_bytes,
        write_folder_atomic, ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG, WEIGHTS,
    };
    use crate::train::lora::{param, LoraConfig};
    use crate::train::model::{TrainLlama, TrainMode};
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Int, Tensor, TensorData};

    /// Last-position logits of the inference model.
    fn logits(m: &Llama<Flex>, ids: &[u32]) -> Vec<f32> {
        let toks: Vec<Option<u32>> = ids.iter().map(|&t| Some(t)).collect();
        let mut cache = m.new_cache(1, ids.len());
        let out = m.forward(&toks, ids.len(), &mut cache).expect("forward");
        out.into_data().to_vec::<f32>().expect("f32")
    }

    /// Last-position logits of the training model (its own LoRA forward, unmerged too).
    fn train_logits(m: &TrainLlama<Flex>, ids: &[u32]) -> Vec<f32> {
        let s = ids.len();
        let data = TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, s]);
        let t = Tensor::<Flex, 2, Int>::from_data(data, &Default::default());
        let out = m.forward(t).narrow(0, s - 1, 1);
        out.into_data().to_vec::<f32>().expect("f32")
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0., f32::max)
    }

    /// A LoRA training model over the random base of `seed` with random (non-zero) B.
    fn trained(seed: u64) -> TrainLlama<Flex> {
        let (dev, c) = (Default::default(), crate::train::tiny_config());
        Flex::seed(&dev, seed);
        let mode = TrainMode::Lora(LoraConfig::all_projections(4));
        let mut m =
            TrainLlama::load(c.clone(), &mut RandomWeights::new(c, 8), &mode, &dev).expect("load");
        for blk in &mut m.blocks {
            for lin in [&mut blk.q, &mut blk.k, &mut blk.up, &mut blk.down] {
                if let Some(l) = lin.lora.as_mut() {
                    let shape = l.b.val().dims();
                    let b = Tensor::random(shape, Distribution::Uniform(-0.3, 0.3), &dev);
                    l.b = param("b", b, true);
                }
            }
        }
        m
    }

    /// The base (random weights of seed 8) as an HF folder and two adapters over it.
    fn folders(root: &Path) -> (PathBuf, [(PathBuf, TrainLlama<Flex>); 2]) {
        let c = crate::train::tiny_config();
        let base = root.join("base");
        let full: TrainLlama<Flex> = TrainLlama::load(
            c.clone(),
            &mut RandomWeights::new(c.clone(), 8),
            &TrainMode::Full,
            &Default::default(),
        )
        .expect("load");
        let bytes = safetensors_bytes(&export_weights(&full).expect("export")).expect("st");
        let config = serde_json::to_vec(&hf_config(&c, None, &[1])).expect("json");
        let files = [(CONFIG.into(), config), (WEIGHTS.into(), bytes)];
        write_folder_atomic(&base, &files, &[]).expect("write base");
        let adapter = |name: &str, m: TrainLlama<Flex>| {
            let dir = root.join(name);
            let lc = LoraConfig::all_projections(4);
            let files = [
                (
                    ADAPTER_CONFIG.to_string(),
                    serde_json::to_vec(&adapter_config(&lc, &base)).expect("json"),
                ),
                (
                    ADAPTER_WEIGHTS.to_string(),
                    safetensors_bytes(&export_adapter(&m).expect("export")).expect("st"),
                ),
            ];
            write_folder_atomic(&dir, &files, &[]).expect("write adapter");
            (dir, m)
        };
        let pair = [adapter("m1", trained(4)), adapter("m2", trained(5))];
        (base, pair)
    }

    #[test]
    fn adapters_over_one_base_share_its_blocks_and_give_the_trained_models_logits() {
        let root = tempfile::tempdir().expect("tmp");
        let (base, [(a1, m1), (a2, m2)]) = folders(root.path());
        let ids = [3u32, 17, 42, 5, 9, 60, 1];
        let (want1, want2) = (train_logits(&m1, &ids), train_logits(&m2, &ids));
        assert!(
            max_diff(&want1, &want2) > 1e-2,
            "the two adapters should differ"
        );

        // f32: the unmerged update is the training model's forward, to rounding.
        let mut f32_loader = InferenceLoader::<Flex>::new(Default::default(), Precision::F32);
        let got = logits(&f32_loader.load(&a1).expect("m1").model, &ids);
        assert!(
            max_diff(&got, &want1) < 1e-4,
            "f32 {}",
            max_diff(&got, &want1)
        );

        // 8-bit blocks: both versions hold the base's blocks themselves, not copies, and each
        // follows its own trained model within the 8-bit rounding of the base.
        let mut loader = InferenceLoader::<Flex>::new(Default::default(), Precision::Q8);
        let plain = loader.load(&base).expect("base").model;
        let (v1, v2) = (loader.load(&a1).expect("m1"), loader.load(&a2).expect("m2"));
        assert!(plain.shares_block_weights_with(&v1.model));
        assert!(plain.shares_block_weights_with(&v2.model));
        // A short prompt takes the row-by-row update, a long one (24 rows) the GEMMs.
        let long: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 64).collect();
        for ids in [&ids[..], &long[..]] {
            let (want1, want2) = (train_logits(&m1, ids), train_logits(&m2, ids));
            let scale = want1.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (v, want, other) in [(&v1, &want1, &want2), (&v2, &want2, &want1)] {
                let got = logits(&v.model, ids);
                let (near, far) = (max_diff(&got, want), max_diff(&got, other));
                assert!(
                    near < 0.02 * scale,
                    "q8 off by {near} (logits up to {scale})"
                );
                assert!(near < far / 4.0, "q8 nearer the other: {near} vs {far}");
            }
        }
        // A base loaded on its own path again is the same model, not a second copy.
        assert!(plain.shares_block_weights_with(&loader.load(&base).expect("again").model));
    }
}
