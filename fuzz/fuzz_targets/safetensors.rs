//! A Hugging Face folder whose `model.safetensors` is arbitrary bytes (and whose config is a real
//! LLaMA's): a clear error or tensors that read inside the file; never a panic.
#![no_main]
use backflow::model::safetensors::HfFolder;
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
  "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
  "num_hidden_layers": 1, "vocab_size": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
  "max_position_embeddings": 32, "tie_word_embeddings": true}"#;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("backflow-fuzz-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("config.json"), CONFIG).expect("config");
    std::fs::write(dir.join("model.safetensors"), data).expect("weights");
    let Ok(folder) = HfFolder::open(&dir) else {
        return;
    };
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] {
        let _ = folder.tensor_f32(name);
    }
});
