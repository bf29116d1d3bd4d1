use backflow::model::kv_cache::KvCache;
use backflow::model::load_checkpoint;
use burn::backend::Flex;
use std::time::Instant;
#[test]
fn scratch() {
    let p = std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/backflow/model/SmolLM2-135M-Instruct.Q4_1.gguf");
    let ck = load_checkpoint::<Flex>(&p, &Default::default()).unwrap();
    let m = ck.model;
    let b: usize = std::env::var("B").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    for cap in [64usize, 256, 1024] {
        let mut cache = KvCache::new(m.config(), b, cap, &Default::default());
        // fill to cap-8 cheaply: prefill with s = cap - 8 would be slow; instead forward 1 token steps from an empty cache is representative of attention cost only via capacity
        let toks: Vec<Option<u32>> = (0..b).map(|i| Some(100 + i as u32)).collect();
        let _ = m.forward(&toks, 1, &mut cache).unwrap();
        let t = Instant::now();
        let n = 5;
        for _ in 0..n { let _ = m.forward(&toks, 1, &mut cache).unwrap(); }
        eprintln!("b={b} cap={} step {:.1} ms", cache.capacity(), t.elapsed().as_secs_f64() * 1000.0 / n as f64);
    }
}
