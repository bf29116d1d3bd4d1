//! The server on the real model: batching, caching, choices, failures.

use super::*;
use crate::model::chat::{ChatTemplate, Message};
use crate::model::device::{default_device, DefaultBackend};
use crate::model::sampling::Sampling;
use std::time::Instant;

/// The real SmolLM2-135M-Instruct GGUF, or `None` (with a message) when it is not cached.
fn model_path() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cache/backflow/model/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} is absent (scripts/fetch-assets.sh fetches it)",
            p.display()
        );
        None
    }
}

/// Sends every conversation at once (so they can share a batch) and waits for the answers,
/// returned in the order asked.
fn ask(
    client: &ModelClient,
    version: &str,
    conversations: &[Vec<Message>],
    max_new_tokens: usize,
) -> Vec<GenAnswer> {
    round_trip(client, conversations.len(), |ticket, reply| GenRequest {
        ticket,
        reply,
        wake: None,
        stream: None,
        ask: greedy_ask(
            version,
            conversations[ticket as usize].clone(),
            max_new_tokens,
        ),
    })
}

/// A plain greedy generation request for `version`.
fn greedy_ask(version: &str, messages: Vec<Message>, max_new_tokens: usize) -> Ask {
    Ask {
        choose: None,
        raw_prompt: None,
        choose_after: None,
        model: version.to_owned(),
        messages,
        max_new_tokens,
        sampling: Sampling::greedy(),
    }
}

/// Sends one greedy request for the user message `text` to `version`, answered on `reply`.
fn send_greedy(
    client: &ModelClient,
    reply: &Sender<GenAnswer>,
    ticket: u64,
    version: &str,
    text: &str,
    max_new_tokens: usize,
) {
    client
        .send(GenRequest {
            ticket,
            reply: reply.clone(),
            wake: None,
            stream: None,
            ask: greedy_ask(version, vec![Message::user(text)], max_new_tokens),
        })
        .expect("send");
}

/// A prompt that runs long (greedy answers do not stop early), one animal per ticket (0..8).
fn story(ticket: u64) -> String {
    let animals = ["cat", "dog", "fox", "owl", "bear", "frog", "goat", "crow"];
    let animal = animals[ticket as usize % animals.len()];
    format!("Write a long story about a {animal} who learns to sail.")
}

/// Sends `n` requests made by `make(ticket, reply)` (tickets 0..n) and returns every
/// answer, in ticket order.
fn round_trip(
    client: &ModelClient,
    n: usize,
    make: impl Fn(u64, Sender<GenAnswer>) -> GenRequest,
) -> Vec<GenAnswer> {
    let (reply, answers) = crossbeam_channel::unbounded();
    for ticket in 0..n as u64 {
        client.send(make(ticket, reply.clone())).expect("send");
    }
    let mut out = receive(&answers, n);
    out.sort_by_key(|a| a.ticket);
    out
}

/// The next `n` answers, in the order they come.
fn receive(answers: &crossbeam_channel::Receiver<GenAnswer>, n: usize) -> Vec<GenAnswer> {
    (0..n)
        .map(|_| {
            answers
                .recv_timeout(Duration::from_secs(600))
                .expect("an answer")
        })
        .collect()
}

fn question() -> Vec<Message> {
    vec![Message::user("What is the capital of France?")]
}

#[test]
fn serve_unloaded_version_is_an_error_counted_per_version_and_not_cached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("answers.bin");
    {
        let server = ModelServer::try_start(ServerConfig {
            cache: Some(path.clone()),
            ..ServerConfig::default()
        })
        .expect("start");
        let client = server.client().expect("client");
        let a = ask(&client, "nope", &[question(), question()], 4);
        assert!(a.iter().all(|a| a.result.is_err()), "{a:?}");
        let v = server.stats().version("nope");
        assert_eq!(
            (v.requests, v.errors, v.cache_hits, v.batches),
            (2, 2, 0, 0)
        );
        assert_eq!(server.stats().errors.load(Ordering::Relaxed), 2);
        assert_eq!(server.stats().version("other"), VersionStats::default());
        let snap = server.stats().snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].0, "nope");
        // A failed load is reported, and does not make the version loaded.
        let missing = dir.path().join("missing.gguf");
        assert!(matches!(
            client.load("nope", &missing),
            Err(ServeError::Load { .. })
        ));
    }
    let cache = AnswerCache::open(&path).expect("reopen");
    assert_eq!(cache.loaded(), 0, "errors are not cached");
}

#[test]
fn serve_foreign_cache_file_fails_try_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("not-a-cache.txt");
    std::fs::write(&path, "hello, this is a text file\n").expect("write");
    let result = ModelServer::try_start(ServerConfig {
        cache: Some(path.clone()),
        ..ServerConfig::default()
    });
    assert!(matches!(result, Err(ServeError::Cache(_))));
    // `start` goes on without the cache and leaves the file alone.
    let server = ModelServer::start(ServerConfig {
        cache: Some(path.clone()),
        ..ServerConfig::default()
    });
    assert!(server.client().is_ok());
    drop(server);
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        "hello, this is a text file\n"
    );
}

#[test]
fn serve_loading_a_loaded_version_again_is_a_no_op() {
    let Some(model) = model_path() else { return };
    let server = ModelServer::start(ServerConfig::default());
    server.load("v0", &model).expect("load");
    let client = server.client().expect("client");
    // Several workers asking for the same version at once: all succeed.
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (client, model) = (client.clone(), model.clone());
            std::thread::spawn(move || client.load("v0", &model))
        })
        .collect();
    for h in handles {
        h.join().expect("join").expect("load again");
    }
    // Already loaded, the path is not even read.
    let t0 = Instant::now();
    client
        .load("v0", Path::new("/nonexistent/model.gguf"))
        .expect("no-op load");
    assert!(t0.elapsed() < Duration::from_secs(1));
    // A new version is loaded for real, so a bad path fails.
    assert!(matches!(
        client.load("v1", Path::new("/nonexistent/model.gguf")),
        Err(ServeError::Load { .. })
    ));
    let a = ask(&client, "v0", &[question()], 4);
    assert!(a[0].result.is_ok(), "{a:?}");
}

#[test]
fn serve_answers_repeated_requests_from_the_cache_across_restarts() {
    let Some(model) = model_path() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("_cache/answers-p000.bin");
    let config = ServerConfig {
        cache: Some(path.clone()),
        ..ServerConfig::default()
    };
    let first = {
        let server = ModelServer::try_start(config.clone()).expect("start");
        let client = server.client().expect("client");
        // Before the model is there: an error, which must not be cached.
        assert!(ask(&client, "v0", &[question()], 6)[0].result.is_err());
        server.load("v0", &model).expect("load");
        let a = ask(&client, "v0", &[question()], 6).remove(0);
        let text = a.result.clone().expect("generated");
        assert!(a.new_tokens > 0 && a.prompt_tokens > 0, "{a:?}");
        let stats = server.stats();
        let generated = stats.new_tokens.load(Ordering::Relaxed);
        assert_eq!(generated, a.new_tokens as u64);
        let b = ask(&client, "v0", &[question()], 6).remove(0);
        assert_eq!(b.result.as_deref(), Ok(text.as_str()));
        assert_eq!(
            (b.prompt_tokens, b.new_tokens),
            (a.prompt_tokens, a.new_tokens)
        );
        assert_eq!(stats.cache_hits.load(Ordering::Relaxed), 1);
        assert_eq!(
            stats.new_tokens.load(Ordering::Relaxed),
            generated,
            "no generation"
        );
        let v = stats.version("v0");
        assert_eq!(
            (v.requests, v.cache_hits, v.errors, v.batches),
            (3, 1, 1, 1)
        );
        // Another length is another answer.
        let c = ask(&client, "v0", &[question()], 3).remove(0);
        assert!(c.result.is_ok());
        assert_eq!(stats.version("v0").cache_hits, 1);
        text
    };
    // A fresh server on the same file: answered without generating, model loaded or not.
    let server = ModelServer::try_start(config.clone()).expect("restart");
    assert_eq!(server.stats().cache_loaded.load(Ordering::Relaxed), 2);
    assert_eq!(
        server.stats().cache_dropped_bytes.load(Ordering::Relaxed),
        0
    );
    let client = server.client().expect("client");
    let again = ask(&client, "v0", &[question()], 6).remove(0);
    assert_eq!(again.result.as_deref(), Ok(first.as_str()));
    server.load("v0", &model).expect("load");
    let again = ask(&client, "v0", &[question()], 6).remove(0);
    assert_eq!(again.result.as_deref(), Ok(first.as_str()));
    let stats = server.stats();
    assert_eq!(stats.new_tokens.load(Ordering::Relaxed), 0);
    assert_eq!(stats.batches.load(Ordering::Relaxed), 0);
    assert_eq!(stats.version("v0").cache_hits, 2);
    drop(client);
    drop(server);
    // The same file, the model in bf16: its answers are its own, not the f32 ones.
    let server = ModelServer::try_start(ServerConfig {
        precision: Precision::Bf16,
        ..config
    })
    .expect("restart in bf16");
    server.load("v0", &model).expect("load bf16");
    let client = server.client().expect("client");
    assert!(ask(&client, "v0", &[question()], 6)[0].result.is_ok());
    let stats = server.stats();
    assert_eq!(stats.version("v0").cache_hits, 0, "no f32 answer served");
    assert!(
        stats.new_tokens.load(Ordering::Relaxed) > 0,
        "generated in bf16"
    );
}

#[test]
fn serve_forced_choice_picks_the_most_likely_option() {
    let Some(model) = model_path() else { return };
    let server = ModelServer::try_start(ServerConfig::default()).expect("start");
    server.load("v0", &model).expect("load");
    let client = server.client().expect("client");
    let messages = vec![Message::user(
        "Rate this answer from 1 to 5. Question: What is 2+2? Answer: 4.",
    )];
    let prefill = "The answer is correct and short.\nScore: ".to_owned();
    let digits: Vec<String> = (1..=5).map(|d| d.to_string()).collect();
    let options = [digits.clone(), vec!["1".into(), "twelve".into()]];
    let got = round_trip(&client, 2, |ticket, reply| GenRequest {
        ticket,
        reply,
        wake: None,
        stream: None,
        ask: Ask {
            model: "v0".into(),
            messages: messages.clone(),
            max_new_tokens: 1,
            sampling: Sampling::greedy(),
            choose: Some(Choice {
                prefill: prefill.clone(),
                options: options[ticket as usize].clone(),
            }),
            raw_prompt: None,
            choose_after: None,
        },
    });
    // Reference: the model's own forward pass, batch 1, a fresh cache, no generator.
    let device = default_device();
    let ck = crate::model::load_checkpoint::<DefaultBackend>(&model, &device, Precision::F32)
        .expect("load");
    let tokenizer = ck.tokenizer.load().expect("tokenizer");
    let template = ChatTemplate::for_tokenizer(&tokenizer).expect("template");
    let mut ids = template.encode(&tokenizer, &messages, true);
    ids.extend(tokenizer.encode(&prefill, false));
    let tokens: Vec<Option<u32>> = ids.iter().map(|&t| Some(t)).collect();
    let mut cache = ck.model.new_cache(1, ids.len());
    let logits: Vec<f32> = ck
        .model
        .forward(&tokens, ids.len(), &mut cache)
        .expect("forward")
        .into_data()
        .to_vec()
        .expect("f32");
    let vocab = ck.model.config().vocab;
    let last = &logits[logits.len() - vocab..];
    let best = digits
        .iter()
        .max_by(|a, b| {
            let l = |d: &String| last[tokenizer.encode(d, false)[0] as usize];
            l(a).total_cmp(&l(b))
        })
        .expect("options");
    assert_eq!(got[0].result.as_deref(), Ok(best.as_str()));
    assert_eq!(got[0].new_tokens, 1);
    let err = got[1]
        .result
        .clone()
        .expect_err("a multi-token option is refused")
        .to_string();
    assert!(err.contains("twelve"), "{err}");
}

#[test]
fn serve_prefix_cache_off_gives_the_same_greedy_answers() {
    let Some(model) = model_path() else { return };
    // A long shared system turn (well over the generator's 32-token threshold), then
    // different questions: the batch's common prefix is what the prefix cache keeps.
    let system = "You are a careful assistant for the Python documentation. Answer in one \
                  short sentence, name the module or function involved, and never invent \
                  an API that does not exist in the standard library of Python 3.11.";
    let conversations: Vec<Vec<Message>> = [
        "How do I read a file line by line?",
        "How do I sort a list of dictionaries by a key?",
        "What does the with statement do?",
    ]
    .iter()
    .map(|q| vec![Message::system(system), Message::user(*q)])
    .collect();
    let answers = |prefix_cache: bool| -> (Vec<String>, VersionStats) {
        let server = ModelServer::start(ServerConfig {
            prefix_cache,
            ..ServerConfig::default()
        });
        server.load("v0", &model).expect("load");
        let client = server.client().expect("client");
        let texts = ask(&client, "v0", &conversations, 12)
            .into_iter()
            .map(|a| a.result.expect("generated"))
            .collect();
        (texts, server.stats().version("v0"))
    };
    let (with, with_stats) = answers(true);
    let (without, without_stats) = answers(false);
    assert!(with.iter().all(|t| !t.is_empty()), "{with:?}");
    assert_eq!(with, without);
    // The comparison means something only if the prefix was shared in one case and not in
    // the other.
    assert_eq!(with_stats.batches, 1, "the three prompts share one batch");
    assert_eq!(with_stats.prompt_tokens, without_stats.prompt_tokens);
    assert_eq!(without_stats.prefill_tokens, without_stats.prompt_tokens);
    assert!(
        with_stats.prefill_tokens + 2 * 32 <= with_stats.prompt_tokens,
        "prefix cache on: {with_stats:?}"
    );
}

#[test]
fn serve_choice_after_the_answer_comes_with_it_and_from_the_cache() {
    let Some(model) = model_path() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ServerConfig {
        cache: Some(dir.path().join("answers.bin")),
        ..ServerConfig::default()
    };
    let digits: Vec<String> = (1..=5).map(|d| d.to_string()).collect();
    // Ticket 0 generates; ticket 1 generates the same, then chooses among `options`.
    let send = |client: &ModelClient, options: &[String]| -> Vec<GenAnswer> {
        round_trip(client, 2, |ticket, reply| GenRequest {
            ticket,
            reply,
            wake: None,
            stream: None,
            ask: Ask {
                model: "v0".into(),
                messages: question(),
                max_new_tokens: 8,
                sampling: Sampling::greedy(),
                choose: None,
                raw_prompt: None,
                choose_after: (ticket == 1).then(|| Choice {
                    prefill: "\nScore: ".into(),
                    options: options.to_vec(),
                }),
            },
        })
    };
    let first = {
        let server = ModelServer::try_start(config.clone()).expect("start");
        server.load("v0", &model).expect("load");
        let client = server.client().expect("client");
        let got = send(&client, &digits);
        // The answer is the plain request's; the choice one of the options.
        assert_eq!(got[1].result, got[0].result);
        assert_eq!(got[0].choice, None);
        let choice = got[1].choice.clone().expect("a choice");
        assert!(digits.contains(&choice), "{choice}");
        // An option that is not one token fails the request, clearly.
        let bad = send(&client, &["1".into(), "twelve".into()]);
        let err = bad[1].result.clone().expect_err("refused").to_string();
        assert!(err.contains("twelve"), "{err}");
        got[1].clone()
    };
    // A fresh server on the same file: text and choice from the cache, no model needed.
    let server = ModelServer::try_start(config).expect("restart");
    let client = server.client().expect("client");
    let again = send(&client, &digits);
    assert_eq!(
        (&again[1].result, &again[1].choice),
        (&first.result, &first.choice)
    );
    assert_eq!(server.stats().batches.load(Ordering::Relaxed), 0);
}

/// Continuous batching on the real model: a request sent while another is decoding joins its
/// batch and is answered first when it is shorter, with the answer it gets alone.
#[test]
fn serve_a_request_joins_a_batch_already_decoding() {
    let Some(model) = model_path() else { return };
    let server = ModelServer::start(ServerConfig::default());
    server.load("v0", &model).expect("load");
    let client = server.client().expect("client");
    let (reply, answers) = crossbeam_channel::unbounded();
    let send = |ticket: u64, text: &str, max_new_tokens: usize| {
        send_greedy(&client, &reply, ticket, "v0", text, max_new_tokens);
    };
    send(0, &story(0), 64);
    // Wait until the long one is decoding, then send two short ones.
    let deadline = Instant::now() + Duration::from_secs(120);
    while server.stats().version("v0").decode_steps < 2 {
        assert!(Instant::now() < deadline, "never started decoding");
        std::thread::sleep(Duration::from_millis(5));
    }
    send(1, "What is the capital of France?", 6);
    send(2, "Name a primary colour.", 6);
    let order = receive(&answers, 3);
    let long = order
        .iter()
        .find(|a| a.ticket == 0)
        .expect("the long answer");
    assert_eq!(
        long.new_tokens, 64,
        "the premise: the long answer runs its 64 tokens"
    );
    assert_eq!(
        order.last().map(|a| a.ticket),
        Some(0),
        "the short requests waited for the long one: {:?}",
        order.iter().map(|a| a.ticket).collect::<Vec<_>>()
    );
    let stats = server.stats().version("v0");
    assert_eq!(stats.batches, 1, "one batch, joined: {stats:?}");
    // Each short answer is what it gets on its own.
    for a in order.iter().filter(|a| a.ticket > 0) {
        let text = if a.ticket == 1 {
            "What is the capital of France?"
        } else {
            "Name a primary colour."
        };
        let alone = ask(&client, "v0", &[vec![Message::user(text)]], 6).remove(0);
        assert_eq!(a.result, alone.result, "ticket {}", a.ticket);
    }
}

/// The KV budget bounds the running batch: with room for no second row, four requests sent
/// together run one at a time (one row per decode step, a batch each), with the answers a
/// server of batches of one gives; with the default budget the same four share decode steps.
#[test]
fn serve_the_kv_cache_budget_bounds_the_running_batch() {
    let Some(model) = model_path() else { return };
    let questions: Vec<Vec<Message>> = [
        "What is the capital of France?",
        "Name a primary colour.",
        "Write a haiku about rain.",
        "What is 2 + 2?",
    ]
    .iter()
    .map(|q| vec![Message::user(*q)])
    .collect();
    let run = |config: ServerConfig| {
        let server = ModelServer::start(config);
        server.load("v0", &model).expect("load");
        let client = server.client().expect("client");
        let answers = ask(&client, "v0", &questions, 12);
        (answers, server.stats().version("v0"))
    };
    let (tight_answers, tight) = run(ServerConfig {
        kv_cache_bytes: 1,
        ..ServerConfig::default()
    });
    let (one_answers, _) = run(ServerConfig {
        max_batch: 1,
        ..ServerConfig::default()
    });
    let (_, roomy) = run(ServerConfig::default());
    assert!(tight.decode_steps > 0, "{tight:?}");
    assert_eq!(tight.decode_rows, tight.decode_steps, "one row at a time");
    assert_eq!(tight.batches, 4, "{tight:?}");
    assert!(
        roomy.decode_rows > roomy.decode_steps,
        "the premise: without the limit they share steps: {roomy:?}"
    );
    for (a, b) in tight_answers.iter().zip(&one_answers) {
        assert!(
            matches!(&a.result, Ok(t) if !t.is_empty()),
            "{:?}",
            a.result
        );
        assert_eq!(a.result, b.result, "ticket {}", a.ticket);
    }
}

/// The version loaded last goes first: four requests for an older version (12 tokens each) and
/// four longer ones for the newer (16), sent together: every answer of the newer version comes
/// before any of the older one's (it steps every tick, the older one tick in four; taking turns,
/// the shorter older ones would finish first), and the older one's are still answered.
#[test]
fn serve_the_last_loaded_version_goes_first() {
    let Some(model) = model_path() else { return };
    let server = ModelServer::start(ServerConfig::default());
    server.load("old", &model).expect("load");
    server.load("new", &model).expect("load");
    let client = server.client().expect("client");
    let (reply, answers) = crossbeam_channel::unbounded();
    let tokens = |ticket: u64| if ticket < 4 { 12 } else { 16 };
    for ticket in 0..8u64 {
        let version = if ticket < 4 { "old" } else { "new" };
        send_greedy(
            &client,
            &reply,
            ticket,
            version,
            &story(ticket),
            tokens(ticket),
        );
    }
    let order = receive(&answers, 8);
    let tickets: Vec<u64> = order.iter().map(|a| a.ticket).collect();
    assert!(
        order.iter().all(|a| a.new_tokens == tokens(a.ticket)),
        "the premise: every answer runs its 12 or 16 tokens: {:?}",
        order.iter().map(|a| a.new_tokens).collect::<Vec<_>>()
    );
    let mut sorted = tickets.clone();
    sorted[..4].sort_unstable();
    sorted[4..].sort_unstable();
    assert_eq!(
        sorted,
        [4, 5, 6, 7, 0, 1, 2, 3],
        "answered in the order {tickets:?}"
    );
}

/// The KV budget holds for the server, not per version: four requests alone set the peak a
/// batch of four takes (`kv_bytes_peak`); with that peak as the budget, four requests for each
/// of two versions sent together hold at most it plus the other version's first row (which
/// always runs), where with room for both the two batches run side by side at twice it. Every
/// request is answered either way.
#[test]
fn serve_one_kv_cache_budget_holds_across_versions() {
    let Some(model) = model_path() else { return };
    let run = |config: ServerConfig, versions: &[&str]| {
        let server = ModelServer::start(config);
        for v in versions {
            server.load(v, &model).expect("load");
        }
        let client = server.client().expect("client");
        let (reply, answers) = crossbeam_channel::unbounded();
        let n = 4 * versions.len();
        for ticket in 0..n as u64 {
            let version = versions[ticket as usize / 4];
            send_greedy(&client, &reply, ticket, version, &story(ticket), 12);
        }
        let got = receive(&answers, n);
        assert!(
            got.iter().all(|a| a.new_tokens == 12),
            "every request answered in full: {:?}",
            got.iter().map(|a| &a.result).collect::<Vec<_>>()
        );
        server.stats().kv_bytes_peak.load(Ordering::Relaxed)
    };
    let alone = run(ServerConfig::default(), &["v0"]);
    assert!(alone > 0, "a batch ran");
    let side_by_side = run(ServerConfig::default(), &["old", "new"]);
    assert!(
        side_by_side as f64 > 1.75 * alone as f64,
        "the premise: with room for both, both batches run at once: {side_by_side} vs {alone}"
    );
    let bounded = run(
        ServerConfig {
            kv_cache_bytes: alone as usize,
            ..ServerConfig::default()
        },
        &["old", "new"],
    );
    assert!(
        (bounded as f64) < 1.5 * alone as f64,
        "one budget for both versions: {bounded} vs {alone}"
    );
}

/// A LoRA adapter folder over `base` at `dir`: rank-4 random updates (uniform in ±`amp`, from
/// `seed`) of every layer's `q_proj` and `down_proj`, in PEFT's layout.
fn random_adapter(dir: &Path, base: &Path, seed: u64, amp: f32) {
    use crate::model::llama::HostTensor;
    use crate::model::{GgufFile, LlamaConfig};
    use crate::train::checkpoint::{
        adapter_config, safetensors_bytes, write_folder_atomic, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
    };
    use crate::train::lora::LoraConfig;
    use rand::{Rng, SeedableRng};
    let cfg = LlamaConfig::from_gguf(&GgufFile::open(base).expect("gguf")).expect("config");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut random = |rows: usize, cols: usize| HostTensor {
        data: (0..rows * cols)
            .map(|_| rng.random_range(-amp..amp))
            .collect(),
        shape: vec![rows, cols],
    };
    let r = 4;
    let q = cfg.n_heads * cfg.head_dim;
    let mut tensors = Vec::new();
    for l in 0..cfg.n_layers {
        for (path, out, inner) in [
            ("self_attn.q_proj", q, cfg.hidden),
            ("mlp.down_proj", cfg.hidden, cfg.ffn),
        ] {
            let name =
                |w: &str| format!("base_model.model.model.layers.{l}.{path}.lora_{w}.weight");
            tensors.push((name("A"), random(r, inner)));
            tensors.push((name("B"), random(out, r)));
        }
    }
    let lc = LoraConfig {
        target_modules: vec!["q_proj".into(), "down_proj".into()],
        ..LoraConfig::all_projections(r)
    };
    let files = [
        (
            ADAPTER_CONFIG.to_string(),
            serde_json::to_vec(&adapter_config(&lc, base)).expect("json"),
        ),
        (
            ADAPTER_WEIGHTS.to_string(),
            safetensors_bytes(&tensors).expect("safetensors"),
        ),
    ];
    write_folder_atomic(dir, &files, &[]).expect("write adapter");
}

/// Two adapters over one base, served at once, run their decode steps in one forward pass
/// (`joint_steps`), and each answers exactly as when it is served alone: its own adapter on its
/// own rows, whatever shares the pass.
#[test]
fn serve_two_adapters_of_one_base_decode_jointly_each_answering_as_alone() {
    let Some(model) = model_path() else { return };
    let root = tempfile::tempdir().expect("tmp");
    let (a1, a2) = (root.path().join("m1"), root.path().join("m2"));
    random_adapter(&a1, &model, 1, 0.05);
    random_adapter(&a2, &model, 2, 0.05);
    let stories: Vec<Vec<Message>> = (0..3).map(|t| vec![Message::user(story(t))]).collect();
    let alone = |version: &str, path: &Path| {
        let server = ModelServer::start(ServerConfig::default());
        server.load(version, path).expect("load");
        let answers = ask(&server.client().expect("client"), version, &stories, 12);
        assert_eq!(server.stats().version(version).joint_steps, 0);
        answers
    };
    let (want1, want2) = (alone("m1", &a1), alone("m2", &a2));
    let text = |a: &GenAnswer| a.result.clone().expect("answered");
    assert_ne!(
        text(&want1[0]),
        text(&want2[0]),
        "the premise: the two adapters answer differently"
    );

    let server = ModelServer::start(ServerConfig::default());
    server.load("m1", &a1).expect("load m1");
    server.load("m2", &a2).expect("load m2");
    let client = server.client().expect("client");
    let (reply, answers) = crossbeam_channel::unbounded();
    for (ticket, version) in (0..6u64).map(|t| (t, if t < 3 { "m1" } else { "m2" })) {
        let ask = greedy_ask(version, stories[ticket as usize % 3].clone(), 12);
        let request = GenRequest {
            ticket,
            reply: reply.clone(),
            wake: None,
            stream: None,
            ask,
        };
        client.send(request).expect("send");
    }
    let mut got = receive(&answers, 6);
    got.sort_by_key(|a| a.ticket);
    for (a, want) in got.iter().zip(want1.iter().chain(&want2)) {
        assert_eq!(text(a), text(want), "ticket {}", a.ticket);
    }
    let (s1, s2) = (server.stats().version("m1"), server.stats().version("m2"));
    assert!(
        s1.joint_steps > 0 && s2.joint_steps > 0,
        "decode steps shared: {} and {}",
        s1.joint_steps,
        s2.joint_steps
    );
}

/// One version serving two kinds of prompt at once (a loop given one model for both steps:
/// instruction prompts and rating prompts, each behind a long template of its own), sent
/// interleaved: each kind runs in a batch of its own, both stepped together, each computing its
/// template once. Allowed one batch at a time, the kinds take turns; without the prefix cache
/// they share one batch and every prompt is prefilled whole. The answers are the same each way.
#[test]
fn serve_two_kinds_of_prompt_run_in_a_batch_each_with_its_own_prefix() {
    let Some(model) = model_path() else { return };
    let template = |kind: &str| {
        format!(
            "You are a careful assistant for {kind}. Read the question, think about what the \
             person asking wants to know, and answer in one short sentence. Do not repeat the \
             question, do not add a greeting, and never write more than one sentence. If the \
             question has no clear answer, say so plainly and stop."
        )
    };
    let questions = [
        "What is the capital of France?",
        "Name a primary colour.",
        "What is 2 + 2?",
    ];
    // A0, B0, A1, B1, A2, B2.
    let conversations: Vec<Vec<Message>> = (0..6)
        .map(|i| {
            let kind = if i % 2 == 0 {
                "geography"
            } else {
                "arithmetic"
            };
            vec![
                Message::system(template(kind)),
                Message::user(questions[i / 2]),
            ]
        })
        .collect();
    let run = |config: ServerConfig| {
        let server = ModelServer::start(config);
        server.load("v0", &model).expect("load");
        let client = server.client().expect("client");
        let answers = ask(&client, "v0", &conversations, 8);
        (answers, server.stats().version("v0"))
    };
    let (apart, per_prefix) = run(ServerConfig::default());
    let (turns, one_at_a_time) = run(ServerConfig {
        max_running_batches: 1,
        ..ServerConfig::default()
    });
    let (mixed, no_prefix) = run(ServerConfig {
        prefix_cache: false,
        ..ServerConfig::default()
    });
    assert_eq!(per_prefix.batches, 2, "a batch per kind: {per_prefix:?}");
    assert!(
        per_prefix.decode_rows > 3 * per_prefix.decode_steps,
        "both kinds' rows in one step: {per_prefix:?}"
    );
    assert!(per_prefix.joint_steps > 0, "in one pass: {per_prefix:?}");
    assert!(
        one_at_a_time.batches >= 2 && one_at_a_time.decode_rows <= 3 * one_at_a_time.decode_steps,
        "one kind at a time: {one_at_a_time:?}"
    );
    assert_eq!(no_prefix.batches, 1, "the premise: {no_prefix:?}");
    assert_eq!(no_prefix.prefill_tokens, no_prefix.prompt_tokens);
    // Each template is over 32 tokens and three rows of its kind start with it: computed once
    // per kind, two rows' worth of it is saved for each.
    assert_eq!(per_prefix.prompt_tokens, no_prefix.prompt_tokens);
    assert!(
        per_prefix.prefill_tokens + 4 * 32 <= per_prefix.prompt_tokens,
        "each template prefilled once: {per_prefix:?}"
    );
    for ((a, b), c) in apart.iter().zip(&turns).zip(&mixed) {
        assert!(
            matches!(&a.result, Ok(t) if !t.is_empty()),
            "{:?}",
            a.result
        );
        assert_eq!(a.result, b.result, "ticket {}", a.ticket);
        assert_eq!(a.result, c.result, "ticket {}", a.ticket);
    }
}

/// Prompts of one template that arrive one at a time (a loop's ratings, each sent as its
/// instruction is written): the second, alone in the queue while the first decodes in a batch
/// with no shared prefix, starts a batch that computes the template it shares with the first
/// and keeps it; the third joins that batch and is prefilled past the template. The answers
/// are each request's alone.
#[test]
fn serve_prompts_arriving_one_by_one_compute_their_shared_template_once() {
    let Some(model) = model_path() else { return };
    let system = "You are a careful assistant. Read the request, think about what the person \
                  asking wants, and answer it plainly. Do not repeat the request, do not add a \
                  greeting, and keep to the point.";
    let conversation = |i: u64| {
        let animal = ["cat", "dog", "fox"][i as usize];
        vec![
            Message::system(system),
            Message::user(format!(
                "Write a long story about a {animal} who learns to sail."
            )),
        ]
    };
    let server = ModelServer::start(ServerConfig::default());
    server.load("v0", &model).expect("load");
    let client = server.client().expect("client");
    let (reply, answers) = crossbeam_channel::unbounded();
    let send = |ticket: u64| {
        let ask = greedy_ask("v0", conversation(ticket), 48);
        (client.send(GenRequest {
            ticket,
            reply: reply.clone(),
            wake: None,
            stream: None,
            ask,
        }))
        .expect("send");
    };
    let wait_until = |what: &str, done: &dyn Fn(&VersionStats) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done(&server.stats().version("v0")) {
            assert!(Instant::now() < deadline, "never {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    send(0);
    wait_until("decoding", &|s| s.decode_steps >= 2);
    send(1);
    wait_until("a second batch", &|s| s.batches >= 2);
    send(2);
    let mut got = receive(&answers, 3);
    got.sort_by_key(|a| a.ticket);
    let stats = server.stats().version("v0");
    assert!(
        got.iter().all(|a| a.new_tokens == 48),
        "the premise: each runs its 48 tokens, so the first two still decode when the next \
         comes"
    );
    assert_eq!(
        stats.batches, 2,
        "the third joined the second's batch: {stats:?}"
    );
    // The first two were prefilled whole; the third past the template (over 32 tokens).
    assert!(
        stats.prefill_tokens + 32 <= stats.prompt_tokens,
        "the template computed once more, then kept: {stats:?}"
    );
    let fresh = ModelServer::start(ServerConfig {
        prefix_cache: false,
        ..ServerConfig::default()
    });
    fresh.load("v0", &model).expect("load");
    let fresh_client = fresh.client().expect("client");
    for a in &got {
        let alone = ask(&fresh_client, "v0", &[conversation(a.ticket)], 48).remove(0);
        assert_eq!(a.result, alone.result, "ticket {}", a.ticket);
    }
}
