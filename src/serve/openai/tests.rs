//! The API over a real (tiny, random) model: what a client sees on the wire, checked against
//! what the model server answers the same request directly.

use super::*;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;

/// A server of one tiny model (or two, `names`), and the folder it lives in.
fn start(names: &[&str], max_in_flight: usize) -> (ApiServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let base = dir.path().join("base");
    crate::train::tiny_base(&base);
    let server = ApiServer::start(ApiConfig {
        addr: "127.0.0.1:0".into(),
        models: names
            .iter()
            .map(|n| (n.to_string(), base.clone()))
            .collect(),
        max_in_flight,
        default_max_tokens: 12,
        server: super::super::ServerConfig {
            precision: crate::model::Precision::F32,
            ..Default::default()
        },
    })
    .expect("start");
    (server, dir)
}

/// One HTTP/1.1 exchange: the status and the body.
fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    // A server that hangs fails the test instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // tiny_http answers a fixed-length body; a chunked one would need decoding.
    (status, body.to_string())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// What the model server answers a greedy chat `ask` directly, without HTTP.
fn direct(server_models: &Path, content: &str, max_new_tokens: usize) -> String {
    let server = ModelServer::try_start(super::super::ServerConfig {
        precision: crate::model::Precision::F32,
        ..Default::default()
    })
    .expect("server");
    server.load("m", server_models).expect("load");
    let (reply, answer) = crossbeam_channel::bounded(1);
    server
        .client()
        .expect("client")
        .send(GenRequest {
            ticket: 0,
            ask: Ask {
                model: "m".into(),
                messages: vec![crate::model::chat::Message::user(content)],
                raw_prompt: None,
                max_new_tokens,
                sampling: Sampling::greedy(),
                choose: None,
                choose_after: None,
            },
            reply,
            wake: None,
            stream: None,
        })
        .expect("send");
    answer.recv().expect("answer").result.expect("text")
}

use std::path::Path;

#[test]
fn chat_answers_as_the_model_server_does_whole_and_streamed() {
    let (server, dir) = start(&["tiny"], 8);
    let addr = server.addr();
    let (status, body) = call(addr, "GET", "/v1/models", "");
    assert_eq!(status, 200);
    assert_eq!(json(&body)["data"][0]["id"], "tiny");

    let want = direct(&dir.path().join("base"), "what is ice?", 12);
    let req = r#"{"model": "tiny", "messages": [{"role": "user", "content": "what is ice?"}],
                 "temperature": 0, "max_tokens": 12}"#;
    let (status, body) = call(addr, "POST", "/v1/chat/completions", req);
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    let usage = &v["usage"];
    let completion_tokens = usage["completion_tokens"].as_u64().expect("tokens");
    assert!((1..=12).contains(&completion_tokens), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().expect("prompt") + completion_tokens)
    );
    let finish = if completion_tokens == 12 {
        "length"
    } else {
        "stop"
    };
    assert_eq!(v["choices"][0]["finish_reason"], finish);

    // Streamed: the events' deltas make the same text, the last says why it ended, then usage
    // (asked for), then [DONE].
    let req = r#"{"messages": [{"role": "user", "content": "what is ice?"}],
                 "temperature": 0, "max_tokens": 12, "stream": true,
                 "stream_options": {"include_usage": true}}"#;
    let (status, body) = call(addr, "POST", "/v1/chat/completions", req);
    assert_eq!(status, 200);
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| json(e)).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], finish);
    assert_eq!(
        chunks[n - 1]["usage"]["completion_tokens"].as_u64(),
        Some(completion_tokens)
    );
    server.shutdown();
}

#[test]
fn stop_strings_cut_the_answer_whole_and_streamed() {
    let (server, dir) = start(&["tiny"], 8);
    let want = direct(&dir.path().join("base"), "say hi.", 12);
    // A stop string from the middle of the greedy answer: everything before it comes back.
    let chars: Vec<char> = want.chars().collect();
    assert!(chars.len() >= 4, "answer too short to cut: {want:?}");
    let stop: String = chars[2..4].iter().collect();
    let cut = &want[..want.find(&stop).expect("stop in answer")];
    for stream in [false, true] {
        let req = serde_json::json!({
            "messages": [{"role": "user", "content": "say hi."}],
            "temperature": 0, "max_tokens": 12, "stop": [stop], "stream": stream,
        });
        let (status, body) = call(
            server.addr(),
            "POST",
            "/v1/chat/completions",
            &req.to_string(),
        );
        assert_eq!(status, 200);
        let text: String = if stream {
            body.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|e| *e != "[DONE]")
                .filter_map(|e| {
                    json(e)["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(String::from)
                })
                .collect()
        } else {
            json(&body)["choices"][0]["message"]["content"]
                .as_str()
                .expect("content")
                .to_string()
        };
        assert_eq!(text, cut, "stream: {stream}");
    }
}

#[test]
fn completions_feed_the_raw_prompt() {
    let (server, _dir) = start(&["tiny"], 8);
    let req = r#"{"prompt": "what is ice", "max_tokens": 5, "temperature": 0}"#;
    let (status, body) = call(server.addr(), "POST", "/v1/completions", req);
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["object"], "text_completion");
    // The raw prompt is its own tokens: one per character in the tiny vocabulary, no template.
    assert_eq!(v["usage"]["prompt_tokens"], "what is ice".len());
    assert!(v["choices"][0]["text"].is_string());
}

#[test]
fn bad_requests_get_a_status_and_a_reason() {
    let (server, _dir) = start(&["a", "b"], 8);
    let addr = server.addr();
    let cases = [
        ("POST", "/v1/chat/completions", "{not json", 400),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model": "a", "messages": []}"#,
            400,
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model": "zzz", "messages": [{"role": "user", "content": "hi"}]}"#,
            404,
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 2}"#,
            400,
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}"#,
            400,
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model": "a", "messages": [{"role": "tool", "content": "hi"}]}"#,
            400,
        ),
        ("GET", "/v2/nothing", "", 404),
    ];
    for (method, path, body, want) in cases {
        let (status, answer) = call(addr, method, path, body);
        assert_eq!(status, want, "{body}: {answer}");
        assert!(json(&answer)["error"]["message"].is_string(), "{answer}");
    }
    let stats = server.stats();
    assert_eq!(stats.failed.load(Ordering::Relaxed), cases.len() as u64);
    assert_eq!(stats.answered.load(Ordering::Relaxed), 0);
}

/// With `max_in_flight` requests being answered, the next is refused at once with 503 and
/// Retry-After; once they finish, requests are answered again.
#[test]
fn a_full_server_refuses_with_503_then_recovers() {
    let (server, _dir) = start(&["tiny"], 1);
    let addr = server.addr();
    // A request whose body never finishes arriving holds the one slot (over 1 KiB, so that
    // tiny_http hands it on before its body is in).
    let mut slow = TcpStream::connect(addr).expect("connect");
    slow.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n{\"mess",
    )
    .expect("send");
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // Give the server time to take it before polling (were a poll in flight when it arrives,
    // the slow request would be the one refused).
    std::thread::sleep(Duration::from_millis(300));
    let mut refused = None;
    for _ in 0..100 {
        let (status, body) = call(addr, "GET", "/health", "");
        if status == 503 {
            refused = Some(body);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let body = refused.expect("never refused while full");
    assert_eq!(json(&body)["error"]["code"], "server_busy");
    // The slow request ends (bad JSON: 400); the slot frees.
    slow.write_all(&[b' '; 9994]).expect("rest of body");
    let mut reader = BufReader::new(slow);
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    assert!(line.contains(" 400 "), "{line}");
    let mut ok = false;
    for _ in 0..100 {
        if call(addr, "GET", "/health", "").0 == 200 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ok, "never answered again");
    assert!(server.stats().refused.load(Ordering::Relaxed) >= 1);
}

#[test]
fn the_stop_filter_holds_back_what_may_start_a_stop_string() {
    let mut f = StopFilter {
        stops: vec!["END".into()],
        held: String::new(),
        stopped: false,
    };
    assert_eq!(f.push("abc E"), "abc ");
    assert_eq!(f.push("N"), "");
    assert_eq!(f.push("x"), "ENx");
    assert_eq!(f.push("yyE"), "yy");
    assert_eq!(f.push("ND tail"), "");
    assert!(f.stopped);
    assert_eq!(f.push("more"), "");
    assert_eq!(f.finish(), "");
    let mut g = StopFilter {
        stops: vec!["END".into()],
        held: String::new(),
        stopped: false,
    };
    assert_eq!(g.push("xE"), "x");
    assert_eq!(g.finish(), "E");
}
