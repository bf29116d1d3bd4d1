//! Running a [`TrainJob`]: reuse a finished checkpoint of the same job, or load the base, encode
//! the data, train (resuming from a checkpoint if asked), evaluate the held-out data, and save.

use std::time::Instant;

use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use crate::model::chat::ChatTemplate;
use crate::model::device::default_device;
use crate::model::tokenizer::Tokenizer;

use super::checkpoint::{self, Adapter, BaseModel};
use super::data::{self, DataStats, Example};
use super::job::{DataGroup, TrainEvent, TrainJob, TrainOutcome};
use super::metrics_log::{append_metrics, truncate_metrics};
use super::model::{TrainLlama, TrainMode};
use super::save::{finished_outcome, json_err, read_meta, MetaEval, SaveKind, Saver};
use super::sft::{eval_loss, micro_batches, step_indices, TrainBackend, Trainer};
use super::{io_err, TrainError};

/// Trains `job` (or reuses its finished checkpoint in `job.out`), logging the held-out losses.
pub fn run_job(job: &TrainJob) -> Result<TrainOutcome, TrainError> {
    let outcome = run_job_with(job, &mut |e| match e {
        TrainEvent::EvalBefore { loss, tokens } => {
            log::info!("held-out loss before training: {loss:.4} ({tokens} output tokens)")
        }
        TrainEvent::EvalAfter { loss, tokens } => {
            log::info!("held-out loss after training:  {loss:.4} ({tokens} output tokens)")
        }
        _ => {}
    });
    // The model, its activations and its optimizer are gone: their pages go back now, not
    // when this thread next allocates (in a loop, the model server would meanwhile need its
    // own and the next training as much again). Its products ran on rayon's threads too.
    crate::memory::release_free_memory_everywhere();
    outcome
}

/// [`run_job`], reporting held-out losses, steps and saves to `on_event` (which does its own
/// logging). Per-step log lines (`quiet`) and the progress bar are shown either way.
pub fn run_job_with(
    job: &TrainJob,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome, TrainError> {
    let t0 = Instant::now();
    job.validate()?;
    let fingerprint = job.fingerprint()?;
    if let Some(done) = finished_outcome(job, &fingerprint)? {
        log::info!(
            "{}: finished checkpoint of this job (version {}), not retrained",
            job.out.display(),
            done.version
        );
        return Ok(done);
    }
    let resume_state = job.out.join(checkpoint::TRAINER_STATE);
    if job.resume {
        if !resume_state.exists() {
            return Err(TrainError::Config(format!(
                "resume: no {} in {}",
                checkpoint::TRAINER_STATE,
                job.out.display()
            )));
        }
        // Resuming another job's checkpoint would silently mix two trainings.
        if let Some(fp) = read_meta(&job.out).and_then(|m| m.job_fingerprint) {
            if fp != fingerprint {
                return Err(TrainError::Config(format!(
                    "resume: the checkpoint in {} was written by a different job (data, base or knobs changed)",
                    job.out.display()
                )));
            }
        }
    }
    let device = default_device();
    TrainBackend::seed(&device, job.seed);
    let full = matches!(job.mode, TrainMode::Full);

    // A full-finetuning resume continues from the saved weights; LoRA re-reads the base.
    let weights_path = if job.resume && full {
        job.out.clone()
    } else {
        job.model.clone()
    };
    let mut base = BaseModel::open(&weights_path)?;
    let cfg = base.config().clone();
    let (tok_src, stop_ids) = base.tokenizer();
    let tokenizer = tok_src.load()?;
    let template = ChatTemplate::for_tokenizer(&tokenizer)?;

    // Data.
    let mut stats = DataStats {
        malformed: job.malformed,
        ..DataStats::default()
    };
    let max_len = job.max_len.min(cfg.max_seq_len);
    let mut examples = encode_groups(
        &job.data,
        &template,
        &tokenizer,
        job.backward,
        max_len,
        &mut stats,
    );
    if examples.is_empty() {
        return Err(TrainError::Data(format!("no usable examples: {stats:?}")));
    }
    let mut held_out: Vec<Example> = Vec::new();
    if !job.eval_data.is_empty() {
        let mut eval_stats = DataStats::default();
        held_out = encode_groups(
            &job.eval_data,
            &template,
            &tokenizer,
            job.backward,
            max_len,
            &mut eval_stats,
        );
        log::info!(
            "held-out data: {} records, {} kept, {} truncated to {max_len}, {} dropped (prompt too long), {} empty",
            eval_stats.records, eval_stats.kept, eval_stats.truncated, eval_stats.prompt_too_long, eval_stats.empty
        );
        if held_out.is_empty() {
            return Err(TrainError::Data(format!(
                "no usable held-out examples: {eval_stats:?}"
            )));
        }
    } else if job.eval_frac > 0.0 {
        if examples.len() < 2 {
            return Err(TrainError::Config(format!(
                "cannot hold out a fraction of {} example(s)",
                examples.len()
            )));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(job.seed ^ 0x5EED);
        examples.shuffle(&mut rng);
        let n =
            ((examples.len() as f64 * job.eval_frac).round() as usize).clamp(1, examples.len() - 1);
        held_out = examples.split_off(examples.len() - n);
    }
    let pad = data::pad_id(&tokenizer, cfg.vocab);
    data::check_vocab(&examples, cfg.vocab)
        .and_then(|()| data::check_vocab(&held_out, cfg.vocab))
        .map_err(TrainError::Data)?;
    log::info!(
        "data: {} records, {} kept ({} train, {} held out), {} truncated to {max_len}, {} dropped (prompt too long), {} empty, {} malformed",
        stats.records, stats.kept, examples.len(), held_out.len(), stats.truncated, stats.prompt_too_long, stats.empty, stats.malformed
    );

    let mut sft = job.sft_config();
    sft.steps = job.steps_for(&sft, examples.len());

    let mut model: TrainLlama<TrainBackend> = base.with_source(|src| {
        TrainLlama::load_with_base(cfg.clone(), src, &job.mode, job.base_format(), &device)
    })?;
    let mut start_step = 0;
    let mut losses = Vec::new();
    let opt_state = if job.resume {
        let text = std::fs::read_to_string(&resume_state).map_err(io_err(&resume_state))?;
        let st: Value = serde_json::from_str(&text).map_err(json_err("trainer state"))?;
        start_step = st["step"]
            .as_u64()
            .ok_or_else(|| TrainError::Checkpoint(format!("{}: no step", resume_state.display())))?
            as usize;
        if !full {
            Adapter::read(&job.out)?.attach(&mut model, &device)?;
        }
        // Steps logged after the checkpoint was saved are run again: drop their lines.
        losses = truncate_metrics(&job.out, start_step)?;
        let p = job.out.join(checkpoint::OPTIMIZER);
        Some(std::fs::read(&p).map_err(io_err(&p))?)
    } else {
        // A fresh run starts a fresh metrics log.
        let m = job.out.join(checkpoint::METRICS);
        if m.exists() {
            std::fs::remove_file(&m).map_err(io_err(&m))?;
        }
        None
    };
    let mut trainer = Trainer::new(model, sft.clone(), device);
    if let Some(state) = opt_state {
        trainer.restore(&state, start_step)?;
    }
    log::info!(
        "{} on {} ({} layers, base {}), {:?}; {} steps x {} examples, lr {:.2e} -> {:.2e}; loaded in {:.1}s",
        job.model.display(),
        crate::model::device::backend_name(),
        cfg.n_layers,
        job.base_format(),
        job.mode,
        sft.steps,
        sft.effective_batch(),
        sft.lr,
        sft.lr_end,
        t0.elapsed().as_secs_f64()
    );

    let eval = |t: &Trainer<TrainBackend>| -> Option<(f64, usize)> {
        (!held_out.is_empty()).then(|| {
            eval_loss(
                &t.valid(),
                &held_out,
                sft.micro_size(),
                pad,
                &default_device(),
            )
        })
    };
    let eval_before = if start_step == 0 {
        eval(&trainer)
    } else {
        None
    };
    if let Some((loss, tokens)) = eval_before {
        on_event(&TrainEvent::EvalBefore { loss, tokens });
    }

    let bar = if job.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(sft.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .map_err(|e| TrainError::Config(format!("progress bar: {e}")))?,
    );
    bar.set_position(start_step as u64);
    let saver = Saver {
        job,
        cfg: &cfg,
        tokenizer: &tokenizer,
        tok_src: &tok_src,
        stop_ids: &stop_ids,
        stats: &stats,
        fingerprint: &fingerprint,
        examples: examples.len(),
    };
    let (mut tok_total, mut secs_total) = (0usize, 0f64);
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    while trainer.step < sft.steps {
        let idx = step_indices(
            examples.len(),
            job.group_by_length.then_some(&lengths[..]),
            trainer.step,
            sft.effective_batch(),
            sft.seed,
        );
        let micro = micro_batches(&examples, &idx, sft.micro_size(), pad);
        let m = trainer.train_step(&micro);
        if !(m.loss.is_finite() && m.grad_norm.is_finite()) {
            // Nothing of this step is logged or saved: the last save stays the checkpoint,
            // unfinished, and the same command with a smaller --lr can resume from it.
            return Err(TrainError::Diverged {
                step: m.step,
                loss: m.loss,
                grad_norm: m.grad_norm,
            });
        }
        tok_total += m.tokens;
        secs_total += m.secs;
        losses.push(m.loss);
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            m.loss,
            m.lr,
            tok_total as f64 / secs_total.max(1e-9)
        ));
        bar.inc(1);
        append_metrics(&job.out, &m)?;
        if job.quiet {
            log::info!(
                "step {} loss {:.4} grad_norm {:.3} {:.0} tok/s, {:.0}% padding",
                m.step,
                m.loss,
                m.grad_norm,
                m.tokens as f64 / m.secs.max(1e-9),
                100.0 * (1.0 - m.tokens as f64 / m.padded_tokens.max(1) as f64)
            );
        }
        on_event(&TrainEvent::Step(m));
        if job.save_every > 0
            && trainer.step.is_multiple_of(job.save_every)
            && trainer.step < sft.steps
        {
            let version = saver.save(&trainer, SaveKind::Partial)?;
            on_event(&TrainEvent::Saved {
                step: trainer.step,
                version,
            });
        }
    }
    bar.finish();
    let eval_after = eval(&trainer);
    if let Some((loss, tokens)) = eval_after {
        on_event(&TrainEvent::EvalAfter { loss, tokens });
    }
    let tokens_per_sec = tok_total as f64 / secs_total.max(1e-9);
    let secs = t0.elapsed().as_secs_f64();
    let version = saver.save(
        &trainer,
        SaveKind::Finished {
            secs,
            tokens_per_sec,
            eval: MetaEval {
                held_out_examples: held_out.len(),
                loss_before: eval_before.map(|e| e.0),
                loss_after: eval_after.map(|e| e.0),
                output_tokens: eval_after.map(|e| e.1),
            },
        },
    )?;
    Ok(TrainOutcome {
        version,
        out: job.out.clone(),
        steps: trainer.step,
        losses,
        tokens_per_sec,
        secs,
        examples: examples.len(),
        data_stats: stats,
        eval_before: eval_before.map(|e| e.0),
        eval_after: eval_after.map(|e| e.0),
        reused: false,
    })
}

/// Encodes every group with its own tag, in order, into one list of examples; counts records,
/// drops and truncations in `stats`.
pub fn encode_groups(
    groups: &[DataGroup],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    backward: bool,
    max_len: usize,
    stats: &mut DataStats,
) -> Vec<Example> {
    let mut out = Vec::new();
    for g in groups {
        stats.records += g.records.len();
        out.extend(data::encode_all(
            &g.records, template, tokenizer, g.source, backward, max_len, stats,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::{DataSource, Record};
    use crate::train::data::{AUGMENTED_TAG, SEED_TAG};
    use crate::train::lora::LoraConfig;
    use crate::train::metrics_log::metrics_lines;
    use crate::train::tiny_base;
    use serde_json::json;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};

    /// Seed pairs (S_a) then web pairs (S_w), four each.
    fn groups() -> Vec<DataGroup> {
        vec![
            DataGroup {
                source: DataSource::Seed,
                records: vec![
                    Record::pair("what is a cat?", "a small animal."),
                    Record::pair("name a color.", "blue."),
                    Record::pair("what is ice?", "frozen water."),
                    Record::pair("say hi.", "hi there."),
                ],
            },
            DataGroup {
                source: DataSource::Augmented,
                records: vec![
                    Record::pair("what is rain?", "water that falls from clouds."),
                    Record::pair("what is a tree?", "a tall plant with a trunk."),
                    Record::pair("what is salt?", "a mineral, sodium chloride."),
                    Record::pair("what is sand?", "small grains of rock."),
                ],
            },
        ]
    }

    fn job(base: &Path, out: &Path) -> TrainJob {
        TrainJob {
            mode: TrainMode::Lora(LoraConfig::all_projections(4)),
            lr: Some(1e-2),
            batch_size: 2,
            steps: Some(3),
            max_len: 256,
            seed: 5,
            eval_frac: 0.25,
            data_label: "test groups".into(),
            ..TrainJob::new(base.to_path_buf(), groups(), out.to_path_buf())
        }
    }

    /// (inode, mtime ns, bytes) of a file: an atomic rewrite changes the inode even when the
    /// content comes out the same.
    fn file_id(p: &Path) -> (u64, i64, i64, Vec<u8>) {
        let m = std::fs::metadata(p).expect("metadata");
        (
            m.ino(),
            m.mtime(),
            m.mtime_nsec(),
            std::fs::read(p).expect("read"),
        )
    }

    /// `backflow.json` as written, every field.
    fn meta(out: &Path) -> Value {
        let text = std::fs::read_to_string(out.join(checkpoint::META)).expect("backflow.json");
        serde_json::from_str(&text).expect("JSON")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
    }

    #[test]
    fn groups_are_encoded_in_order_with_their_own_tags() {
        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base");
        tiny_base(&base);
        let tok = Tokenizer::from_tokenizer_json(base.join("tokenizer.json")).expect("tokenizer");
        let template = ChatTemplate::for_tokenizer(&tok).expect("chatml");
        let mut stats = DataStats::default();
        let ex = encode_groups(&groups(), &template, &tok, false, 256, &mut stats);
        assert_eq!((stats.records, stats.kept, ex.len()), (8, 8, 8));
        let text: Vec<String> = ex.iter().map(|e| tok.decode(&e.ids)).collect();
        for (i, t) in text.iter().enumerate() {
            let (want, other) = if i < 4 {
                (SEED_TAG, AUGMENTED_TAG)
            } else {
                (AUGMENTED_TAG, SEED_TAG)
            };
            assert!(t.contains(want) && !t.contains(other), "example {i}: {t:?}");
        }
        // In the order given: the first seed record, then the first web record at 4.
        assert!(text[0].contains("what is a cat?") && text[0].contains("a small animal."));
        assert!(text[4].contains("water that falls from clouds."));
        // The backward model gets no tag, whatever the group.
        let mut st = DataStats::default();
        let bwd = encode_groups(&groups(), &template, &tok, true, 256, &mut st);
        let t = tok.decode(&bwd[5].ids);
        assert!(!t.contains(AUGMENTED_TAG) && t.contains("a tall plant with a trunk."));
    }

    #[test]
    fn fingerprint_covers_base_data_tags_and_knobs_not_output_settings() {
        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base.gguf");
        std::fs::write(&base, b"not really a model").expect("write");
        let j = job(&base, &root.path().join("out"));
        let fp = j.fingerprint().expect("fingerprint");
        assert_eq!(fp.len(), 32);
        let same = |f: &dyn Fn(&mut TrainJob)| {
            let mut k = j.clone();
            f(&mut k);
            k.fingerprint().expect("fingerprint")
        };
        // Where and how the result is written does not change it.
        assert_eq!(same(&|k| k.out = PathBuf::from("/elsewhere")), fp);
        assert_eq!(same(&|k| k.quiet = !k.quiet), fp);
        assert_eq!(same(&|k| k.save_every = 7), fp);
        assert_eq!(same(&|k| k.resume = true), fp);
        assert_eq!(same(&|k| k.data_label = "other".into()), fp);
        // Nor the passes a batch is computed in (the same gradient).
        assert_eq!(same(&|k| k.micro_batch = 8), fp);
        // `epochs` is moot when `steps` is given.
        assert_eq!(same(&|k| k.epochs = Some(5.0)), fp);
        // Everything that changes the weights does.
        type Change<'a> = (&'a str, Box<dyn Fn(&mut TrainJob)>);
        let changes: Vec<Change> = vec![
            (
                "record text",
                Box::new(|k| k.data[1].records[2] = Record::pair("what is salt?", "a rock.")),
            ),
            (
                "group tag",
                Box::new(|k| k.data[1].source = DataSource::Seed),
            ),
            ("record order", Box::new(|k| k.data[0].records.swap(0, 1))),
            (
                "group split",
                Box::new(|k| {
                    let r = k.data[1].records.remove(0);
                    k.data[0].records.push(r);
                }),
            ),
            ("lr", Box::new(|k| k.lr = Some(2e-2))),
            ("steps", Box::new(|k| k.steps = Some(4))),
            (
                "epochs",
                Box::new(|k| {
                    k.steps = None;
                    k.epochs = Some(2.0)
                }),
            ),
            ("seed", Box::new(|k| k.seed = 6)),
            ("max_len", Box::new(|k| k.max_len = 128)),
            ("backward", Box::new(|k| k.backward = true)),
            ("eval_frac", Box::new(|k| k.eval_frac = 0.5)),
            (
                "eval data",
                Box::new(|k| {
                    k.eval_frac = 0.0;
                    k.eval_data = vec![DataGroup {
                        source: DataSource::Seed,
                        records: vec![Record::pair("what is ice?", "frozen water.")],
                    }];
                }),
            ),
            ("mode", Box::new(|k| k.mode = TrainMode::Full)),
            (
                "lora rank",
                Box::new(|k| k.mode = TrainMode::Lora(LoraConfig::all_projections(8))),
            ),
            ("batch", Box::new(|k| k.batch_size = 4)),
            (
                "group by length",
                Box::new(|k| k.group_by_length = !k.group_by_length),
            ),
        ];
        for (what, f) in changes {
            assert_ne!(same(&*f), fp, "{what} did not change the fingerprint");
        }
        // The base's content, at the same path.
        std::fs::write(&base, b"not really a model!").expect("write");
        assert_ne!(j.fingerprint().expect("fingerprint"), fp, "base content");
    }

    #[test]
    fn held_out_data_is_evaluated_and_never_trained_on() {
        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base");
        tiny_base(&base);
        let held = vec![DataGroup {
            source: DataSource::Seed,
            records: vec![
                Record::pair("what is fog?", "a cloud near the ground."),
                Record::pair("what is steam?", "hot water vapour."),
            ],
        }];
        let with_data = |data: Vec<DataGroup>, out: &str| TrainJob {
            eval_frac: 0.0,
            eval_data: held.clone(),
            data,
            ..job(&base, &root.path().join(out))
        };
        let a = run_job(&with_data(groups(), "a")).expect("train a");
        assert_eq!(a.examples, 8, "every training record is trained on");
        let (before, after) = (a.eval_before.expect("before"), a.eval_after.expect("after"));
        assert!(before.is_finite() && after.is_finite());
        assert_ne!(before, after, "training moved the held-out loss");
        // Before training the model is the base (LoRA's B starts at zero): the held-out loss
        // cannot depend on the training data.
        let b = run_job(&with_data(groups()[1..].to_vec(), "b")).expect("train b");
        assert_eq!(b.examples, 4);
        assert!(close(b.eval_before.expect("before"), before));
        // Both ways of holding out at once are refused.
        let both = TrainJob {
            eval_frac: 0.25,
            ..with_data(groups(), "c")
        };
        assert!(matches!(run_job(&both), Err(TrainError::Config(_))));
    }

    #[test]
    fn identical_finished_job_is_reused_and_a_changed_one_retrains() {
        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base");
        tiny_base(&base);
        let out = root.path().join("out");
        let j = job(&base, &out);
        let first = run_job(&j).expect("train");
        assert!(!first.reused);
        assert_eq!(first.steps, 3);
        assert_eq!(first.examples, 6, "8 examples, 2 held out");
        assert_eq!(first.losses.len(), 3);
        assert!(first.losses.iter().all(|l| l.is_finite() && *l > 0.0));
        assert!(first.eval_before.is_some() && first.eval_after.is_some());
        let weights = out.join(checkpoint::ADAPTER_WEIGHTS);
        let before = file_id(&weights);
        assert_eq!(checkpoint::content_hash(&before.3), first.version);
        assert_eq!(
            meta(&out)["job_fingerprint"].as_str(),
            Some(j.fingerprint().expect("fp").as_str())
        );
        assert_eq!(meta(&out)["groups"][1]["source"], json!("Augmented"));

        // The same job again: nothing is trained or written.
        let again = run_job(&j).expect("reuse");
        assert!(again.reused);
        assert_eq!(file_id(&weights), before, "weights were rewritten");
        assert_eq!(again.version, first.version);
        assert_eq!((again.steps, again.examples), (first.steps, first.examples));
        assert_eq!(again.data_stats, first.data_stats);
        assert_eq!(again.losses.len(), 3);
        for (a, b) in again.losses.iter().zip(&first.losses) {
            assert!(close(*a, *b), "{:?} vs {:?}", again.losses, first.losses);
        }
        let (eb, ea) = (
            again.eval_before.expect("before"),
            again.eval_after.expect("after"),
        );
        assert!(close(eb, first.eval_before.unwrap_or(f64::NAN)));
        assert!(close(ea, first.eval_after.unwrap_or(f64::NAN)));
        // Output-only settings are not part of the job.
        let mut louder = j.clone();
        louder.save_every = 1;
        assert!(run_job(&louder).expect("reuse").reused);
        assert_eq!(file_id(&weights), before);

        // One changed record: trained again, under a new fingerprint.
        let mut edited = j.clone();
        edited.data[0].records[1] = Record::pair("name a color.", "red.");
        let third = run_job(&edited).expect("retrain");
        assert!(!third.reused);
        assert_ne!(file_id(&weights).0, before.0, "weights not rewritten");
        assert_eq!(
            meta(&out)["job_fingerprint"].as_str(),
            Some(edited.fingerprint().expect("fp").as_str())
        );
        // One changed knob: trained again.
        let mut faster = edited.clone();
        faster.lr = Some(3e-2);
        let fourth = run_job(&faster).expect("retrain");
        assert!(!fourth.reused);
        // Resuming someone else's checkpoint is refused.
        let mut other = faster.clone();
        other.seed = 99;
        other.resume = true;
        match run_job(&other) {
            Err(TrainError::Config(m)) => assert!(m.contains("different job"), "{m}"),
            r => panic!("resume of another job's checkpoint: {r:?}"),
        }
        // Damaged weights are not reused.
        std::fs::write(&weights, b"garbage").expect("damage");
        let fifth = run_job(&faster).expect("retrain");
        assert!(!fifth.reused);
        assert_eq!(
            checkpoint::content_hash(&std::fs::read(&weights).expect("read")),
            fifth.version
        );
    }

    /// Copies the files of folder `from` into a new folder `to`.
    fn copy_folder(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read_dir") {
            let p = e.expect("entry").path();
            std::fs::copy(&p, to.join(p.file_name().expect("name"))).expect("copy");
        }
    }

    #[test]
    fn a_run_killed_after_a_save_resumes_to_the_same_losses() {
        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base");
        tiny_base(&base);
        let out = root.path().join("out");
        let killed = root.path().join("killed");
        let mut j = job(&base, &out);
        j.steps = Some(4);
        j.save_every = 2;
        // Snapshot `out` as a kill after step 3 leaves it: the step-2 checkpoint, and a metrics
        // log that already has step 3.
        let mut saved_at = Vec::new();
        let whole = run_job_with(&j, &mut |e| match e {
            TrainEvent::Saved { step, .. } => saved_at.push(*step),
            TrainEvent::Step(m) if m.step == 3 => copy_folder(&out, &killed),
            _ => {}
        })
        .expect("train");
        assert_eq!(saved_at, [2]);
        assert_eq!(meta(&killed)["finished"], json!(false));
        assert_eq!(metrics_lines(&killed).expect("metrics").len(), 3);

        let mut resumed_job = j.clone();
        resumed_job.out = killed.clone();
        resumed_job.resume = true;
        let resumed = run_job(&resumed_job).expect("resume");
        assert!(!resumed.reused);
        assert_eq!(resumed.steps, 4);
        assert!(resumed.eval_before.is_none(), "no 'before' loss mid-run");
        assert_eq!(resumed.losses.len(), 4, "{:?}", resumed.losses);
        for (a, b) in resumed.losses.iter().zip(&whole.losses) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{:?} vs {:?}",
                resumed.losses,
                whole.losses
            );
        }
        // Step 3 is logged once, by the resumed run.
        let steps: Vec<usize> = metrics_lines(&killed)
            .expect("metrics")
            .iter()
            .map(|l| l.0)
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        assert_eq!(meta(&killed)["finished"], json!(true));
        // And now it is a finished checkpoint of the job: reused.
        assert!(run_job(&resumed_job).expect("reuse").reused);
    }
}
