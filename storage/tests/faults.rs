//! Fault injection through the block store: each fault kind gives a clear typed error or a
//! successful retry, and a seeded fuzz loop shows a read returns exactly what was written or an
//! error, never wrong data, a panic or a hang.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Rng, ScratchDir, engines};
use strata_storage::{BlockStore, BlockStoreConfig, DiskSlot, FaultConfig, IoEngine, StorageError};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const SLOT: usize = 16384;

fn store(
    dir: &ScratchDir,
    engine: IoEngine,
    spec: &str,
    slots: u64,
) -> Result<BlockStore, Box<dyn std::error::Error>> {
    let faults = Some(FaultConfig::parse(spec)?);
    let cfg = BlockStoreConfig {
        engine,
        queue_depth: 8,
        faults,
        ..BlockStoreConfig::new(dir.path(), slots * SLOT as u64, SLOT)
    };
    Ok(BlockStore::open(cfg)?)
}

/// Writes `n` random blocks; returns the slots and their data.
fn write_some(
    st: &mut BlockStore,
    rng: &mut Rng,
    n: usize,
) -> Result<(Vec<DiskSlot>, Vec<Vec<u8>>), StorageError> {
    let slots: Vec<DiskSlot> = (0..n).map(|_| st.alloc_slot()).collect::<Result<_, _>>()?;
    let data: Vec<Vec<u8>> = (0..n).map(|_| rng.bytes(SLOT)).collect();
    let items: Vec<(DiskSlot, &[u8])> = slots
        .iter()
        .zip(&data)
        .map(|(s, d)| (*s, d.as_slice()))
        .collect();
    st.write_blocks(&items)?;
    Ok((slots, data))
}

fn read_exact(
    st: &mut BlockStore,
    slots: &[DiskSlot],
    data: &[Vec<u8>],
) -> Result<(), StorageError> {
    st.read_blocks(slots, |i, bytes| {
        assert_eq!(bytes, data[i].as_slice(), "block {i} came back wrong");
        Ok(())
    })
}

#[test]
fn eio_on_every_write_is_retried_three_times_then_reported_with_path_and_offset() -> TestResult {
    let dir = ScratchDir::new("eio");
    let mut st = store(&dir, IoEngine::Sync, "seed=1,eio=1", 4)?;
    assert_eq!(st.engine_name(), "faulty(sync)");
    match write_some(&mut st, &mut Rng::new(1), 1) {
        Err(StorageError::Io {
            path,
            offset,
            source,
            ..
        }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EIO));
            assert!(path.starts_with(dir.path()) && offset == 0);
        }
        other => return Err(format!("expected Io, got {other:?}").into()),
    }
    assert_eq!(st.stats().retries, 3);
    Ok(())
}

#[test]
fn enospc_is_reported_at_once() -> TestResult {
    let dir = ScratchDir::new("enospc");
    let mut st = store(&dir, IoEngine::Sync, "enospc=1", 4)?;
    let r = write_some(&mut st, &mut Rng::new(2), 2);
    assert!(matches!(r, Err(StorageError::NoSpace { .. })), "{r:?}");
    assert_eq!(st.stats().retries, 0);
    Ok(())
}

#[test]
fn persistent_short_transfers_end_in_a_short_io_error() -> TestResult {
    let dir = ScratchDir::new("short");
    let mut st = store(&dir, IoEngine::Sync, "short=1", 4)?;
    let r = write_some(&mut st, &mut Rng::new(3), 1);
    match r {
        Err(StorageError::ShortIo { expected, got, .. }) => assert!(got < expected),
        other => return Err(format!("expected ShortIo, got {other:?}").into()),
    }
    Ok(())
}

#[test]
fn persistent_corruption_is_retried_once_then_reported() -> TestResult {
    let dir = ScratchDir::new("corrupt");
    let mut st = store(&dir, IoEngine::Sync, "seed=4,corrupt=1", 4)?;
    let (slots, data) = write_some(&mut st, &mut Rng::new(4), 2)?;
    let r = read_exact(&mut st, &slots, &data);
    assert!(matches!(r, Err(StorageError::Corrupt { .. })), "{r:?}");
    assert!(st.stats().corrupt_reads >= 2);
    Ok(())
}

#[test]
fn transient_faults_are_retried_and_data_is_exact() -> TestResult {
    for engine in engines() {
        for spec in [
            "seed=5,eio=0.1",
            "seed=16,short=0.1",
            "seed=7,corrupt=0.1",
            "seed=8,latency_ms=2:1",
        ] {
            let dir = ScratchDir::new(&format!("transient-{engine:?}"));
            let mut st = store(&dir, engine, spec, 16)?;
            let started = Instant::now();
            let (slots, data) = write_some(&mut st, &mut Rng::new(5), 16)?;
            read_exact(&mut st, &slots, &data)?;
            let stats = st.stats();
            if spec.contains("latency") {
                assert!(
                    started.elapsed() >= Duration::from_millis(2),
                    "{spec}: latency injected"
                );
            } else {
                assert!(
                    stats.retries > 0,
                    "{engine:?} {spec}: faults were injected and retried"
                );
            }
            eprintln!("{engine:?} {spec}: {} retries", stats.retries);
        }
    }
    Ok(())
}

/// What the model knows of a slot.
enum Known {
    Data(Vec<u8>),
    Unreadable, // allocated, never written or last write failed
}

fn random_spec(rng: &mut Rng, seed: u64) -> String {
    let mut rate = |max: f64| {
        if rng.below(3) == 0 {
            0.0
        } else {
            rng.unit() * max
        }
    };
    format!(
        "seed={seed},eio={:.3},short={:.3},enospc={:.3},corrupt={:.3},latency_ms=1:{:.3}",
        rate(0.3),
        rate(0.3),
        rate(0.05),
        rate(0.3),
        rate(0.2)
    )
}

fn expected_error(e: &StorageError) -> bool {
    matches!(
        e,
        StorageError::Io { .. }
            | StorageError::NoSpace { .. }
            | StorageError::ShortIo { .. }
            | StorageError::Corrupt { .. }
    )
}

#[test]
fn fuzz_reads_return_exactly_what_was_written_or_an_error() -> TestResult {
    let watchdog_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&watchdog_done);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(240));
        if !flag.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!("fault fuzz hung for 240 s");
            std::process::exit(101);
        }
    });
    let engines = engines();
    let (mut ok_reads, mut failed_ops) = (0u64, 0u64);
    for seed in 0..32u64 {
        let mut rng = Rng::new(seed * 7919 + 1);
        let engine = engines[seed as usize % engines.len()];
        let spec = random_spec(&mut rng, seed);
        let dir = ScratchDir::new(&format!("fuzz-{seed}"));
        let mut st = store(&dir, engine, &spec, 24)?;
        let mut model: BTreeMap<DiskSlot, Known> = BTreeMap::new();
        for _op in 0..40 {
            match rng.below(10) {
                0..=1 => {
                    if let Ok(slot) = st.alloc_slot() {
                        model.insert(slot, Known::Unreadable);
                    }
                }
                2 => {
                    let Some(&slot) = model.keys().nth(rng.below(model.len().max(1))) else {
                        continue;
                    };
                    st.free_slot(slot)?;
                    model.remove(&slot);
                }
                3..=5 => {
                    let mut slots: Vec<DiskSlot> = model.keys().copied().collect();
                    rng.shuffle(&mut slots);
                    slots.truncate(1 + rng.below(8));
                    let data: Vec<Vec<u8>> = slots
                        .iter()
                        .map(|_| {
                            let len = 1 + rng.below(SLOT);
                            rng.bytes(len)
                        })
                        .collect();
                    let items: Vec<(DiskSlot, &[u8])> = slots
                        .iter()
                        .zip(&data)
                        .map(|(s, d)| (*s, d.as_slice()))
                        .collect();
                    match st.write_blocks(&items) {
                        Ok(()) => {
                            for (s, d) in slots.iter().zip(data) {
                                model.insert(*s, Known::Data(d));
                            }
                        }
                        Err(e) => {
                            assert!(expected_error(&e), "seed {seed} ({spec}): write: {e}");
                            failed_ops += 1;
                            for s in &slots {
                                model.insert(*s, Known::Unreadable);
                            }
                        }
                    }
                }
                _ => {
                    let mut slots: Vec<DiskSlot> = model
                        .iter()
                        .filter(|(_, k)| matches!(k, Known::Data(_)))
                        .map(|(s, _)| *s)
                        .collect();
                    rng.shuffle(&mut slots);
                    slots.truncate(1 + rng.below(12));
                    let r = st.read_blocks(&slots, |i, bytes| {
                        let Some(Known::Data(want)) = model.get(&slots[i]) else {
                            panic!("seed {seed}: read of slot {:?} not in the model", slots[i]);
                        };
                        assert_eq!(bytes, want.as_slice(), "seed {seed} ({spec}): wrong data");
                        ok_reads += 1;
                        Ok::<(), StorageError>(())
                    });
                    if let Err(e) = r {
                        assert!(expected_error(&e), "seed {seed} ({spec}): read: {e}");
                        failed_ops += 1;
                    }
                    // Slots that cannot be read must say so, not return stale bytes.
                    let unreadable = model.iter().find(|(_, k)| matches!(k, Known::Unreadable));
                    if let Some((&slot, _)) = unreadable {
                        let r = st.read_blocks(&[slot], |_, _| Ok::<(), StorageError>(()));
                        assert!(matches!(r, Err(StorageError::InvalidSlot { .. })), "{r:?}");
                    }
                }
            }
            assert!(st.in_use() <= st.capacity_slots());
        }
    }
    watchdog_done.store(true, std::sync::atomic::Ordering::Relaxed);
    eprintln!("fuzz: {ok_reads} blocks read back exactly, {failed_ops} operations failed cleanly");
    assert!(ok_reads > 100 && failed_ops > 0);
    Ok(())
}
