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

    /// Prompts right-aligned into one `batch × s` token block (padding first).
    fn right_aligned(prompts: &[Vec<u32>]) -> (Vec<Option<u32>>, usize) {
        let s = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let mut tokens = Vec::new();
        for p in prompts {
            tokens.extend(std::iter::repeat_n(None, s - p.len()));
            tokens.extend(p.iter().map(|&t| Some(t)));
        }
        (tokens, s)
    }

    #[test]
    fn versions_over_one_base_run_jointly_each_through_its_own_adapter() {
        use crate::model::llama::Pass;
        let root = tempfile::tempdir().expect("tmp");
        let (base, [(a1, _), (a2, _)]) = folders(root.path());
        let long: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 64).collect();
        let short = [vec![3, 17, 42, 5], vec![9, 60]];
        // Per step, each pass's tokens, a row each: a prefill (v2's with the long prompt: 60
        // rows, the GEMM form of its update; v1's 8 rows, the row-by-row form), a decode step,
        // then three tokens for the base's row beside single tokens for the others.
        let calls: [[Vec<Vec<u32>>; 3]; 3] = [
            [
                short.to_vec(),
                vec![vec![1, 2]],
                [&short[..], &[long]].concat(),
            ],
            [vec![vec![11]; 2], vec![vec![12]], vec![vec![11]; 3]],
            [vec![vec![7]; 2], vec![vec![12, 13, 14]], vec![vec![7]; 3]],
        ];
        // (F32: dense weights, device updates; Q8: blocks, host updates.)
        for precision in [Precision::F32, Precision::Q8] {
            let mut loader = InferenceLoader::<Flex>::new(Default::default(), precision);
            let plain = loader.load(&base).expect("base").model;
            let v1 = loader.load(&a1).expect("m1").model;
            let v2 = loader.load(&a2).expect("m2").model;
            assert!(v1.shares_base_with(&plain) && v2.shares_base_with(&v1));
            // v1, the base (no update, between two that have one), v2 (v1's prompts first).
            let models = [&v1, &plain, &v2];
            let batch = |i: usize| calls[0][i].len();
            let step_tokens = |step: usize, i: usize| right_aligned(&calls[step][i]);
            // Each alone, in its own cache.
            let mut alone: Vec<Vec<Vec<f32>>> = Vec::new();
            for (i, m) in models.iter().enumerate() {
                let mut cache = m.new_cache(batch(i), 32);
                let mut out = Vec::new();
                for step in 0..3 {
                    let (tokens, s) = step_tokens(step, i);
                    let logits = m.forward(&tokens, s, &mut cache).expect("alone");
                    out.push(logits.into_data().to_vec::<f32>().expect("f32"));
                }
                alone.push(out);
            }
            // Together, in one pass per step.
            let mut caches: Vec<_> = (0..3).map(|i| models[i].new_cache(batch(i), 32)).collect();
            let alone_per_step = (0..3).map(|step| alone.iter().map(move |a| &a[step]));
            for (step, alone) in alone_per_step.enumerate() {
                let blocks: Vec<(Vec<Option<u32>>, usize)> =
                    (0..3).map(|i| step_tokens(step, i)).collect();
                let mut passes: Vec<Pass<'_, Flex>> = (models.iter().zip(&blocks))
                    .zip(caches.iter_mut())
                    .map(|((m, (tokens, s)), cache)| Pass {
                        model: m,
                        tokens,
                        s: *s,
                        cache,
                    })
                    .collect();
                let joint = Llama::forward_jointly(&mut passes).expect("jointly");
                assert_eq!(joint.len(), 3);
                for (i, (logits, want)) in joint.into_iter().zip(alone).enumerate() {
                    let got = logits.into_data().to_vec::<f32>().expect("f32");
                    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let d = max_diff(&got, want);
                    assert!(
                        d <= 1e-5 * scale.max(1.0),
                        "{precision:?} step {step} pass {i}: off by {d} (logits up to {scale})"
                    );
                }
            }
            // The adapters matter on these rows: v1 and v2 on the same prompts differ.
            let (l1, l2) = (&alone[0][0], &alone[2][0][..alone[0][0].len()]);
            assert!(max_diff(l1, l2) > 1e-2, "{precision:?}: the versions agree");
            // Another base's model cannot join a pass.
            let other = InferenceLoader::<Flex>::new(Default::default(), precision)
                .load(&base)
                .expect("base again")
                .model;
            assert!(!other.shares_base_with(&plain));
            let (tokens, s) = right_aligned(&[vec![1, 2]]);
            let (mut c1, mut c2) = (plain.new_cache(1, 8), other.new_cache(1, 8));
            let mut passes = [
                Pass {
                    model: &plain,
                    tokens: &tokens,
                    s,
                    cache: &mut c1,
                },
                Pass {
                    model: &other,
                    tokens: &tokens,
                    s,
                    cache: &mut c2,
                },
            ];
            let err = Llama::forward_jointly(&mut passes).expect_err("two bases");
            assert!(err.to_string().contains("share their base"), "{err}");
        }
    }

    #[test]
    fn generators_of_two_versions_stepped_jointly_give_each_its_own_tokens() {
        use crate::model::{Generator, Request, Sampling};
        let root = tempfile::tempdir().expect("tmp");
        let (_, [(a1, _), (a2, _)]) = folders(root.path());
        let mut loader = InferenceLoader::<Flex>::new(Default::default(), Precision::Q8);
        let (v1, v2) = (loader.load(&a1).expect("m1"), loader.load(&a2).expect("m2"));
        // Row 0 greedy, the others sampled (seeded per request: the same tokens in any batch),
        // each wanting its own number of tokens, so rows leave the batches at different steps.
        let requests = |n: usize| -> Vec<Request> {
            (0..n)
                .map(|i| {
                    let prompt = vec![3 + i as u32, 17, 42, 5 + i as u32];
                    let mut r = Request::greedy(prompt, 4 + 3 * i);
                    if i > 0 {
                        r.sampling = Sampling {
                            temperature: 1.0,
                            top_p: 1.0,
                            seed: i as u64,
                        };
                    }
                    r
                })
                .collect()
        };
        let (r1, r2) = (requests(3), requests(2));
        let mut g1 = Generator::new(v1.model, Vec::new());
        let mut g2 = Generator::new(v2.model, Vec::new());
        let want1 = g1.generate(&r1).expect("alone 1");
        let want2 = g2.generate(&r2).expect("alone 2");
        assert_ne!(
            want1[1].ids, want2[1].ids,
            "the two versions should answer differently"
        );

        let keyed = |r: &[Request]| {
            r.iter()
                .cloned()
                .enumerate()
                .map(|(i, r)| (i as u64, r))
                .collect()
        };
        let (b1, _) = g1.start(keyed(&r1)).expect("start 1");
        let (b2, _) = g2.start(keyed(&r2)).expect("start 2");
        let (mut b1, mut b2) = (b1.expect("batch 1"), b2.expect("batch 2"));
        let mut got1: Vec<Option<Vec<u32>>> = vec![None; r1.len()];
        let mut got2: Vec<Option<Vec<u32>>> = vec![None; r2.len()];
        let mut joint_steps = 0;
        while !b1.is_empty() || !b2.is_empty() {
            for (k, c) in g1.pick(&mut b1, &mut |_, _| {}).expect("pick 1") {
                got1[k as usize] = Some(c.ids);
            }
            for (k, c) in g2.pick(&mut b2, &mut |_, _| {}).expect("pick 2") {
                got2[k as usize] = Some(c.ids);
            }
            joint_steps += usize::from(b1.has_picked() && b2.has_picked());
            Generator::advance_jointly(&mut [(&mut g1, vec![&mut b1]), (&mut g2, vec![&mut b2])])
                .expect("advance");
            assert!(!b1.has_picked() && !b2.has_picked());
        }
        assert!(joint_steps >= 4, "{joint_steps} steps ran both versions");
        let ids = |c: &[crate::model::Completion]| {
            c.iter().map(|c| Some(c.ids.clone())).collect::<Vec<_>>()
        };
        assert_eq!(got1, ids(&want1));
        assert_eq!(got2, ids(&want2));
    }
}
