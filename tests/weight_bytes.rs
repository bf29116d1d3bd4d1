//! The model's own memory against its file, counted independently from the GGUF's tensor
//! table: loaded in its own blocks (`native`) a model holds its file's tensor bytes, give or
//! take the few tensors kept in another format, never an expanded copy; in f32, four bytes per
//! parameter, the tied embedding once. The Qwen files are checked when fetched
//! (`scripts/fetch-assets.sh qwen05 qwen15`).

mod common;
use backflow::model::quant::resident::{simd, Simd};
use backflow::model::{load_checkpoint, GgufFile, Precision};
use burn::backend::Flex;

/// `(bytes, parameters)` of the file's tensors, from its tensor table.
fn file_tensors(file: &GgufFile) -> (usize, usize) {
    let (mut bytes, mut params) = (0, 0);
    for t in &file.tensors {
        let n = t.n_elements() as usize;
        let (per_block, block_bytes) = t.ty.block_layout().expect("a type backflow reads");
        bytes += n / per_block * block_bytes;
        params += n;
    }
    (bytes, params)
}

#[test]
fn weights_in_memory_are_the_files_size() {
    let Some(smol) = common::model_and_seed() else {
        return;
    };
    let qwen = [
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ]
    .map(|n| common::cache_dir().join("model").join(n));
    for path in std::iter::once(smol.clone()).chain(qwen.into_iter().filter(|p| p.exists())) {
        let file = GgufFile::open(&path).expect("open");
        let (bytes, params) = file_tensors(&file);
        let native = load_checkpoint::<Flex>(&path, &Default::default(), Precision::Native)
            .expect("load native");
        let held = native.model.weight_bytes();
        let ratio = held as f64 / bytes as f64;
        eprintln!(
            "{}: {held} bytes held, file tensors {bytes} ({ratio:.4}x)",
            path.display()
        );
        // Measured 1.018-1.019x on all three (2026-12-06); a 4-bit tensor widened to 8 bits
        // would put the 135M at ~1.5x. Without panels (no AVX2, or `BACKFLOW_Q4K_PANELS=0`)
        // the file's blocks are kept with f32 scales: the 135M 1.156x (2026-12-07).
        let most = if simd() != Simd::None { 1.03 } else { 1.2 };
        assert!((1.0..most).contains(&ratio), "{}: {ratio}", path.display());
        // Every block matrix in the weights' arena, on huge pages, where the machine has the
        // panels (the file's own 4/5/6-bit blocks stay on the heap only without them).
        let (placed, matrices) = native.model.block_matrices_in_arena();
        eprintln!("{placed} of {matrices} block matrices in the arena");
        assert!(matrices > 0);
        if simd() != Simd::None {
            assert_eq!(placed, matrices, "{}", path.display());
        }
        if path == smol {
            let f32 = load_checkpoint::<Flex>(&path, &Default::default(), Precision::F32)
                .expect("load f32");
            assert_eq!(f32.model.weight_bytes(), 4 * params);
        }
    }
}
