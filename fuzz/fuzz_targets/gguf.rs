//! The GGUF header parser on arbitrary files: a clear error or a file whose every tensor is
//! bounds-checked; never a panic, never an allocation the file's size does not justify.
#![no_main]
use backflow::model::gguf::GgufFile;
use backflow::model::LlamaConfig;
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("backflow-fuzz-{}.gguf", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(data))
        .expect("temp file");
    let Ok(file) = GgufFile::open(&path) else {
        return;
    };
    let _ = LlamaConfig::from_gguf(&file);
    let _ = file.tokenizer_meta();
    for info in &file.tensors {
        if let Ok(bytes) = file.tensor_bytes(info) {
            assert!(bytes.len() <= data.len());
            let _ = file.tensor_f32(&info.name);
        }
    }
});
