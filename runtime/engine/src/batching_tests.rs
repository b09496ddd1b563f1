//! The batching engine end to end on CPU: batched sequences generate exactly what they generate
//! alone, cancellation and preemption give blocks back, bad input is refused without disturbing
//! anyone else, and RoPE stays exact in bf16 past a thousand positions.

use std::time::{Duration, Instant};

use candle_core::{DType, Device};

use crate::checkpoint::Checkpoint;
use crate::checkpoint_pool::CheckpointPool;
use crate::engine::{EngineConfig, EngineHandle, start_engine};
use crate::error::EngineError;
use crate::kv_cache::{BLOCK_SIZE, KvStorage};
use crate::network::{Architecture, Batch, Network, SeqChunk, WeightHandling};
use crate::params::SamplingParams;
use crate::sequence::FinishReason;
use crate::tiny_model::{TinySpec, make_tiny_model};

const PROMPTS: [&str; 8] = [
    "Once",
    "The lighthouse keeper climbed the stairs",
    "A small boat",
    "In the morning the fishermen went down to the harbour and looked at the grey sea before",
    "She",
    "The old man told the children a story about",
    "Rain fell on the village",
    "When the storm came the lamp",
];

fn engine_for(spec: &TinySpec, config: EngineConfig) -> (tempfile::TempDir, EngineHandle) {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(dir.path(), spec).unwrap();
    let pool = CheckpointPool::new(1 << 30, None);
    let (pooled, _) = pool.checkout(Checkpoint::open(dir.path()).unwrap(), &|_| {}).unwrap();
    let engine = start_engine("tiny", &pooled, false, &Device::Cpu, &config).unwrap();
    (dir, engine)
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { max_tokens, ..Default::default() }
}

async fn generate_all(engine: &EngineHandle, prompts: &[&str], params: &SamplingParams) -> Vec<String> {
    let streams: Vec<_> = prompts.iter().map(|p| engine.submit(p.to_string(), params.clone()).unwrap()).collect();
    let mut texts = Vec::new();
    for s in streams {
        texts.push(s.collect().await.unwrap().0);
    }
    texts
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_batch_of_mixed_length_prompts_generates_what_each_generates_alone() {
    for arch in Architecture::ALL {
        let spec = TinySpec::new(arch);
        // A small step budget so long prompts are prefilled in chunks beside others' decodes.
        let config = EngineConfig { max_step_tokens: 16, max_running: 8, ..Default::default() };
        let (_dir, batched) = engine_for(&spec, config);
        let together = generate_all(&batched, &PROMPTS, &greedy(40)).await;
        assert!(batched.stats.steps.load(std::sync::atomic::Ordering::Relaxed) < 8 * 40, "{arch:?} did batch");
        let (_dir, single) = engine_for(&spec, EngineConfig { max_running: 1, ..Default::default() });
        for (prompt, text) in PROMPTS.iter().zip(&together) {
            let alone = generate_all(&single, &[prompt], &greedy(40)).await;
            assert_eq!(text, &alone[0], "{arch:?}: {prompt:?} differs in a batch");
            assert!(!text.is_empty());
        }
    }
}

#[tokio::test]
async fn a_seed_replays_the_same_text_whatever_else_is_in_the_batch() {
    let (_dir, engine) = engine_for(&TinySpec::new(Architecture::Qwen2), EngineConfig::default());
    let sampled = SamplingParams { max_tokens: 24, temperature: 0.9, top_p: 0.9, seed: Some(42), ..Default::default() };
    let alone = generate_all(&engine, &["Once"], &sampled).await;
    let mut crowd = vec!["Once"];
    crowd.extend_from_slice(&PROMPTS[1..]);
    let mut noisy = sampled.clone();
    noisy.seed = None;
    let others: Vec<_> = crowd[1..].iter().map(|p| engine.submit(p.to_string(), noisy.clone()).unwrap()).collect();
    let again = generate_all(&engine, &["Once"], &sampled).await;
    for s in others {
        s.collect().await.unwrap();
    }
    assert_eq!(alone, again);
}

#[tokio::test]
async fn a_cancelled_sequence_gives_its_blocks_back_and_others_carry_on() {
    let (_dir, engine) = engine_for(&TinySpec::new(Architecture::Llama), EngineConfig::default());
    let keep = engine.submit("Once".into(), greedy(30)).unwrap();
    let mut cancel = engine.submit(PROMPTS[3].into(), greedy(400)).unwrap();
    cancel.next().await.unwrap().unwrap();
    drop(cancel);
    let (text, finish) = keep.collect().await.unwrap();
    assert!(!text.is_empty() && finish.usage.completion_tokens > 0);
    let stats = engine.stats.clone();
    wait_until("the cancelled sequence is gone", || {
        engine.in_flight() == 0 && stats.kv_blocks_used.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
    assert_eq!(stats.running.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_tiny_kv_cache_preempts_and_still_completes_every_request_correctly() {
    let spec = TinySpec::new(Architecture::Qwen2);
    // Room for about two sequences at a time; eight want in.
    let per_token = make_tiny_model(tempfile::tempdir().unwrap().path(), &spec).unwrap().kv_bytes_per_token(4);
    let config = EngineConfig { kv_cache_bytes: (8 * BLOCK_SIZE * per_token) as u64, ..Default::default() };
    let (_dir, small) = engine_for(&spec, config);
    let together = generate_all(&small, &PROMPTS, &greedy(40)).await;
    assert!(
        small.stats.preemptions.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the cache was too small to avoid it"
    );
    let (_dir, roomy) = engine_for(&spec, EngineConfig::default());
    assert_eq!(together, generate_all(&roomy, &PROMPTS, &greedy(40)).await);
}

#[tokio::test]
async fn bad_input_is_refused_at_once_and_disturbs_no_one() {
    let config = EngineConfig { max_context: Some(64), ..Default::default() };
    let (_dir, engine) = engine_for(&TinySpec::new(Architecture::Mistral), config);
    let healthy = engine.submit("Once".into(), greedy(20)).unwrap();
    let long = "the lighthouse ".repeat(100);
    let huge = "x".repeat(10 << 20);
    let too_long = |e: &EngineError| matches!(e, EngineError::PromptTooLong(_));
    let invalid = |e: &EngineError| matches!(e, EngineError::InvalidParams(_));
    let cases = [
        (long, greedy(8), too_long as fn(&EngineError) -> bool),
        (huge, greedy(8), too_long),
        ("hi".into(), greedy(0), invalid),
        ("".into(), greedy(8), invalid),
        ("hi".into(), SamplingParams { temperature: f32::NAN, ..greedy(8) }, invalid),
        ("hi".into(), SamplingParams { temperature: -1.0, ..greedy(8) }, invalid),
        ("hi".into(), SamplingParams { top_p: 0.0, ..greedy(8) }, invalid),
        ("hi".into(), SamplingParams { top_p: 1.5, ..greedy(8) }, invalid),
    ];
    for (prompt, params, expected) in cases {
        let started = Instant::now();
        let err = engine.submit(prompt, params.clone()).err().expect("refused");
        assert!(expected(&err), "{params:?} gave {err:?}");
        assert!(started.elapsed() < Duration::from_secs(1), "refused before any tokenizing of huge input");
    }
    // A budget far beyond the context is cut to what the context leaves, ending with `length`.
    let (_, finish) = engine.submit("Once".into(), greedy(4_000_000_000)).unwrap().collect().await.unwrap();
    assert_eq!(finish.reason, FinishReason::Length);
    assert!(finish.usage.prompt_tokens + finish.usage.completion_tokens <= 64);
    assert!(!healthy.collect().await.unwrap().0.is_empty());
}

#[tokio::test]
async fn a_full_engine_answers_overloaded() {
    let config = EngineConfig { max_running: 1, max_waiting: 1, ..Default::default() };
    let (_dir, engine) = engine_for(&TinySpec::new(Architecture::Llama), config);
    let a = engine.submit("Once".into(), greedy(50)).unwrap();
    let b = engine.submit("Once".into(), greedy(50)).unwrap();
    assert!(matches!(engine.submit("Once".into(), greedy(5)), Err(EngineError::Overloaded(_))));
    drop((a, b));
    wait_until("the dropped sequences are gone", || engine.in_flight() == 0).await;
    engine.generate("Once".into(), greedy(5)).await.unwrap();
}

/// Logits of the last position after feeding `ids` in chunks through a fresh cache.
fn last_logits(network: &Network, ids: &[u32], chunk: usize) -> Vec<f32> {
    let c = &network.config;
    let blocks = ids.len().div_ceil(BLOCK_SIZE);
    let kv = KvStorage::new(c.num_layers, c.num_kv_heads, c.head_dim, blocks, network.dtype, &network.device).unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut logits = None;
    for start in (0..ids.len()).step_by(chunk) {
        let len = chunk.min(ids.len() - start);
        let sample = start + len == ids.len();
        let batch = Batch {
            tokens: ids[start..start + len].to_vec(),
            chunks: vec![SeqChunk { start, len, block_table: table.clone(), sample }],
        };
        let out = network.forward(&batch, &kv).unwrap();
        if sample {
            logits = Some(out.to_vec2::<f32>().unwrap().remove(0));
        }
    }
    logits.unwrap()
}

#[test]
fn bf16_rope_stays_exact_past_a_thousand_positions() {
    for arch in [Architecture::Qwen2, Architecture::Llama] {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec { max_position_embeddings: 2048, ..TinySpec::new(arch) };
        make_tiny_model(dir.path(), &spec).unwrap();
        let pool = CheckpointPool::new(1 << 30, None);
        let (pooled, _) = pool.checkout(Checkpoint::open(dir.path()).unwrap(), &|_| {}).unwrap();
        let build = |dtype| {
            let tensors = pooled.load_tensors(&Device::Cpu, dtype).unwrap();
            let how = WeightHandling { dtype, dequantize: false };
            Network::new(pooled.ckpt.config.clone(), tensors, 2048, how, &Device::Cpu).unwrap()
        };
        let (f32_net, bf16_net) = (build(DType::F32), build(DType::BF16));
        let vocab = f32_net.config.vocab_size as u32;
        let ids: Vec<u32> = (0..1100u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let reference = last_logits(&f32_net, &ids, 1100);
        let chunked = last_logits(&f32_net, &ids, 100);
        let max_diff = reference.iter().zip(&chunked).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-3, "{arch:?}: chunked prefill differs from one pass by {max_diff}");
        let low = last_logits(&bf16_net, &ids, 256);
        let dot: f32 = reference.iter().zip(&low).map(|(a, b)| a * b).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cosine = dot / (norm(&reference) * norm(&low));
        // The whole bf16 network at position 1100 tracks the f32 one (RoPE exactness itself is
        // pinned down in `network::rope`'s tests, where a collapsed position is whole radians off).
        assert!(cosine > 0.995, "{arch:?}: bf16 logits at position 1100 drift from f32 (cosine {cosine})");
        assert_eq!(crate::sampling::argmax(&reference), crate::sampling::argmax(&low), "{arch:?}");
    }
}
