//! `backflow serve` with the real SmolLM2-135M-Instruct, asked by the official OpenAI Python
//! client (tests/openai_client.py, `scripts/fetch-assets.sh openai`): the answers it gets are
//! `backflow generate`'s own for the same prompts, whole and streamed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn openai_python() -> Option<std::path::PathBuf> {
    common::pip_venv("venv-openai", "openai").map(|v| v.join("bin/python"))
}

fn generate(model: &std::path::Path, prompt: &str, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_backflow"))
        .args(["generate", "--model"])
        .arg(model)
        .args(["--prompt", prompt])
        .args(extra)
        .output()
        .expect("run generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    // `generate` ends its output with a newline of its own.
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

#[test]
fn the_openai_client_gets_backflows_answers() {
    let Some(model) = common::model_and_seed() else {
        return;
    };
    let Some(py) = openai_python() else {
        return;
    };
    let mut server = Command::new(env!("CARGO_BIN_EXE_backflow"))
        .args(["serve", "--port", "0", "--model"])
        .arg(&model)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start serve");
    // The address comes in the "serving ... on http://ADDR/v1" line.
    let mut lines = BufReader::new(server.stderr.take().expect("stderr")).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("serve exited before listening")
            .expect("line");
        if let Some(rest) = line.split("on http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().expect("addr"));
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let prompt = "Give three tips for staying healthy.";
    let raw = "The capital of France is";
    let out = Command::new(&py)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_client.py"
        ))
        .args([&url, prompt, raw])
        .output()
        .expect("run the client");
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client JSON");

    let id = model
        .file_name()
        .expect("name")
        .to_string_lossy()
        .replace(".gguf", "");
    assert_eq!(got["models"], serde_json::json!([id]));
    let want = generate(&model, prompt, &["--max-tokens", "24"]);
    let chat = &got["chat"];
    assert_eq!(chat["content"].as_str(), Some(want.as_str()), "{chat}");
    assert_eq!(chat["role"], "assistant");
    let tokens = chat["usage"]["completion_tokens"].as_u64().expect("usage");
    assert_eq!(
        chat["finish_reason"],
        if tokens == 24 { "length" } else { "stop" }
    );

    // Streamed: the same text, in more than one piece (relayed as it is generated).
    let pieces: Vec<&str> = got["stream"]["pieces"]
        .as_array()
        .expect("pieces")
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert!(pieces.len() > 3, "{pieces:?}");
    assert_eq!(pieces.concat(), want);
    assert_eq!(got["stream"]["finish_reason"], chat["finish_reason"]);
    assert_eq!(got["stream"]["completion_tokens"].as_u64(), Some(tokens));

    // A completion is the raw prompt's continuation.
    let want_raw = generate(&model, raw, &["--raw", "--max-tokens", "8"]);
    assert_eq!(got["completion"]["text"].as_str(), Some(want_raw.as_str()));

    assert_eq!(got["bad_request"]["status"], 400, "{}", got["bad_request"]);
}
