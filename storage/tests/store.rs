//! Block store: round trips on every real engine and queue depth, capacity and space checks,
//! crash left-overs, on-disk corruption, multi-file layout.

mod common;

use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};

use common::{Rng, ScratchDir, engines};
use strata_storage::{BlockStore, BlockStoreConfig, DiskSlot, IoEngine, StorageError};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn config(
    dir: &ScratchDir,
    slots: u64,
    slot_bytes: usize,
    engine: IoEngine,
    qd: usize,
) -> BlockStoreConfig {
    let rounded = slot_bytes.next_multiple_of(4096) as u64;
    BlockStoreConfig {
        engine,
        queue_depth: qd,
        ..BlockStoreConfig::new(dir.path(), slots * rounded, slot_bytes)
    }
}

/// Writes random blocks (random lengths, random slot order, in batches), reads them back in
/// another random order with repeats, and checks every byte.
fn round_trip(
    store: &mut BlockStore,
    rng: &mut Rng,
    blocks: usize,
) -> Result<Vec<DiskSlot>, Box<dyn std::error::Error>> {
    let slot_bytes = store.slot_bytes();
    let mut slots: Vec<DiskSlot> = (0..blocks)
        .map(|_| store.alloc_slot())
        .collect::<Result<_, _>>()?;
    rng.shuffle(&mut slots);
    let data: HashMap<DiskSlot, Vec<u8>> = slots
        .iter()
        .map(|&s| {
            let len = if rng.below(4) == 0 {
                1 + rng.below(slot_bytes)
            } else {
                slot_bytes
            };
            (s, rng.bytes(len))
        })
        .collect();
    for batch in slots.chunks(1 + rng.below(blocks)) {
        let items: Vec<(DiskSlot, &[u8])> =
            batch.iter().map(|s| (*s, data[s].as_slice())).collect();
        store.write_blocks(&items)?;
    }
    let mut order = slots.clone();
    order.extend_from_slice(&slots[..blocks / 3]);
    rng.shuffle(&mut order);
    let mut seen = vec![0usize; order.len()];
    store.read_blocks(&order, |i, bytes| {
        seen[i] += 1;
        assert_eq!(
            bytes,
            data[&order[i]].as_slice(),
            "slot {:?} read back wrong",
            order[i]
        );
        Ok::<(), StorageError>(())
    })?;
    assert!(
        seen.iter().all(|&n| n == 1),
        "every block exactly once: {seen:?}"
    );
    let stats = store.stats();
    assert_eq!(stats.reads, order.len() as u64);
    assert!(stats.writes >= blocks as u64 && stats.bytes_read > 0 && stats.read_seconds > 0.0);
    Ok(slots)
}

#[test]
fn round_trip_on_every_engine_and_queue_depth() -> TestResult {
    for engine in engines() {
        for qd in [1, 4, 32] {
            let dir = ScratchDir::new(&format!("rt-{engine:?}-{qd}"));
            let mut store = BlockStore::open(config(&dir, 64, 200_000, engine, qd))?;
            assert_eq!(
                store.slot_bytes() % 512,
                0,
                "slot rounded to the block size"
            );
            let expected = if engine == IoEngine::Uring {
                "io_uring"
            } else {
                "sync"
            };
            assert_eq!(store.engine_name(), expected, "{}", store.engine_reason());
            eprintln!(
                "{engine:?} qd {qd}: {} (direct: {})",
                store.engine_reason(),
                store.is_direct()
            );
            round_trip(&mut store, &mut Rng::new(qd as u64), 48)?;
            assert_eq!(dir.kv_files().len(), 1);
            drop(store);
            assert!(dir.kv_files().is_empty(), "files removed on drop");
        }
    }
    Ok(())
}

/// Allocates `n` slots and writes a random block of `bytes` to each; returns the slots and
/// their data, in order.
fn written_blocks(
    store: &mut BlockStore,
    rng: &mut Rng,
    n: usize,
    bytes: usize,
) -> Result<(Vec<DiskSlot>, Vec<Vec<u8>>), StorageError> {
    let slots: Vec<DiskSlot> = (0..n)
        .map(|_| store.alloc_slot())
        .collect::<Result<_, _>>()?;
    let data: Vec<Vec<u8>> = slots.iter().map(|_| rng.bytes(bytes)).collect();
    let items: Vec<(DiskSlot, &[u8])> = slots
        .iter()
        .zip(&data)
        .map(|(s, d)| (*s, d.as_slice()))
        .collect();
    store.write_blocks(&items)?;
    Ok((slots, data))
}

/// Owned reads: the callback hands each block to another thread, which keeps it a while (so
/// every staging buffer is held and nothing is in flight at times) and checks it before
/// dropping it. The read waits for buffers to come back and delivers every block once.
#[test]
fn owned_reads_wait_for_buffers_the_caller_holds() -> TestResult {
    for engine in engines() {
        let dir = ScratchDir::new(&format!("owned-{engine:?}"));
        let mut store = BlockStore::open(config(&dir, 16, 8192, engine, 2))?;
        let (slots, data) = written_blocks(&mut store, &mut Rng::new(7), 12, 8192)?;
        let (tx, rx) = std::sync::mpsc::channel::<(usize, strata_storage::ReadBlock)>();
        let expected = data.clone();
        let checker = std::thread::spawn(move || {
            let mut seen = vec![0usize; expected.len()];
            for (i, block) in rx {
                std::thread::sleep(std::time::Duration::from_millis(5));
                assert_eq!(
                    block.bytes(),
                    expected[i].as_slice(),
                    "block {i} read back wrong"
                );
                seen[i] += 1;
            }
            seen
        });
        store.read_blocks_owned(&slots, |i, block| {
            tx.send((i, block)).map_err(|_| StorageError::WorkersGone)
        })?;
        drop(tx);
        let seen = checker.join().map_err(|_| "checker panicked")?;
        assert!(seen.iter().all(|&n| n == 1), "every block once: {seen:?}");
    }
    Ok(())
}

/// A read stream extended while it runs: `more()` hands out two further batches (one of them
/// repeating a slot) once everything before is submitted; every block of the three batches
/// arrives once under its stream index, and an unwritten slot offered later fails the stream.
#[test]
fn a_read_stream_takes_more_slots_while_it_runs() -> TestResult {
    for engine in engines() {
        let dir = ScratchDir::new(&format!("stream-{engine:?}"));
        let mut store = BlockStore::open(config(&dir, 16, 4096, engine, 3))?;
        let (slots, data) = written_blocks(&mut store, &mut Rng::new(11), 10, 4096)?;
        let mut batches = vec![slots[7..].to_vec(), vec![slots[4], slots[0]]];
        let mut stream: Vec<DiskSlot> = slots[..4].to_vec();
        let mut seen: Vec<usize> = Vec::new();
        let mut offered = Vec::new();
        store.read_stream(
            &slots[..4],
            || {
                let b = batches.pop().unwrap_or_default();
                offered.extend(b.iter().copied());
                b
            },
            |i, _block| {
                seen.push(i);
                Ok::<(), StorageError>(())
            },
        )?;
        stream.extend(offered);
        seen.sort_unstable();
        assert_eq!(seen, (0..stream.len()).collect::<Vec<_>>(), "{engine:?}");
        assert_eq!(stream.len(), 4 + 2 + 3);
        // An unwritten slot offered mid-stream is an error naming it.
        let fresh = store.alloc_slot()?;
        let mut once = Some(vec![fresh]);
        let r = store.read_stream(
            &slots[..2],
            || once.take().unwrap_or_default(),
            |_, _| Ok::<(), StorageError>(()),
        );
        assert!(
            matches!(r, Err(StorageError::InvalidSlot { .. })),
            "{engine:?}: {r:?}"
        );
        // The store still reads after the failed stream.
        store.read_blocks(&slots[..3], |i, bytes| {
            assert_eq!(bytes, data[i].as_slice());
            Ok::<(), StorageError>(())
        })?;
    }
    Ok(())
}

#[test]
fn capacity_is_split_over_files_and_slots_never_exceed_it() -> TestResult {
    let dir = ScratchDir::new("split");
    let cfg = config(&dir, 10, 16384, IoEngine::Sync, 4);
    let mut store = BlockStore::open_split(cfg, 4 * 16384)?;
    assert_eq!(store.capacity_slots(), 10);
    assert_eq!(dir.kv_files().len(), 3, "10 slots at 4 per file");
    let slots = round_trip(&mut store, &mut Rng::new(9), 10)?;
    assert!(matches!(
        store.alloc_slot(),
        Err(StorageError::Full { capacity_slots: 10 })
    ));
    assert_eq!(store.in_use(), 10);
    store.free_slot(slots[3])?;
    assert!(matches!(
        store.free_slot(slots[3]),
        Err(StorageError::InvalidSlot { .. })
    ));
    assert_eq!(store.in_use(), 9);
    assert_eq!(store.alloc_slot()?, slots[3]);
    assert!(store.in_use() <= store.capacity_slots());
    Ok(())
}

#[test]
fn impossible_capacity_reports_the_missing_space_and_leaves_nothing() -> TestResult {
    let dir = ScratchDir::new("nospace");
    let free = strata_storage::free_bytes(dir.path())?;
    let cfg = BlockStoreConfig::new(dir.path(), free + (1 << 40), 1 << 20);
    match BlockStore::open(cfg) {
        Err(e @ StorageError::NotEnoughSpace { .. }) => {
            let msg = e.to_string();
            eprintln!("{msg}");
            assert!(msg.contains("missing") && msg.contains("free") && msg.contains("need"));
            assert!(msg.contains(&dir.path().display().to_string()));
        }
        Err(e) => return Err(format!("wrong error: {e}").into()),
        Ok(_) => return Err("an impossible capacity was accepted".into()),
    }
    assert!(
        dir.kv_files().is_empty(),
        "no file left behind: {:?}",
        dir.kv_files()
    );
    Ok(())
}

#[test]
fn crash_leftovers_are_removed_and_live_files_kept() -> TestResult {
    let dir = ScratchDir::new("leftovers");
    let dead = 999_999;
    // SAFETY: signal 0 only checks whether the process exists.
    if unsafe { libc::kill(dead, 0) } == 0 {
        eprintln!("pid {dead} is alive here; skipping");
        return Ok(());
    }
    let stale = dir.path().join(format!("strata-{dead}-0.kv"));
    let live = dir.path().join("strata-1-0.kv"); // pid 1 is always alive
    let other = dir.path().join("notes.kv");
    for p in [&stale, &live, &other] {
        std::fs::write(p, b"x")?;
    }
    let store = BlockStore::open(config(&dir, 4, 4096, IoEngine::Sync, 2))?;
    assert!(!stale.exists(), "left-over of a dead pid removed");
    assert!(
        live.exists() && other.exists(),
        "files of live processes and others kept"
    );
    drop(store);
    assert_eq!(
        dir.kv_files(),
        vec!["notes.kv".to_string(), "strata-1-0.kv".to_string()]
    );
    Ok(())
}

#[test]
fn on_disk_corruption_is_detected_with_slot_path_and_offset() -> TestResult {
    for engine in engines() {
        let dir = ScratchDir::new(&format!("corrupt-{engine:?}"));
        let mut store = BlockStore::open(config(&dir, 4, 8192, engine, 4))?;
        let slots: Vec<DiskSlot> = (0..3)
            .map(|_| store.alloc_slot())
            .collect::<Result<_, _>>()?;
        let data = Rng::new(5).bytes(8192);
        let items: Vec<(DiskSlot, &[u8])> = slots.iter().map(|&s| (s, data.as_slice())).collect();
        store.write_blocks(&items)?;
        let path = dir.path().join(&dir.kv_files()[0]);
        let victim = slots[1];
        let offset = u64::from(victim.index()) * store.slot_bytes() as u64 + 100;
        let mut f = std::fs::OpenOptions::new().write(true).open(&path)?;
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(b"garbage")?;
        f.sync_all()?;
        let mut good = 0;
        let err = store.read_blocks(&slots, |_, bytes| {
            assert_eq!(bytes, data.as_slice());
            good += 1;
            Ok::<(), StorageError>(())
        });
        match err {
            Err(StorageError::Corrupt {
                slot,
                path: p,
                offset: o,
            }) => {
                assert_eq!(slot, victim.index());
                assert_eq!(p, path);
                assert_eq!(o, offset - 100);
            }
            other => return Err(format!("{engine:?}: expected Corrupt, got {other:?}").into()),
        }
        assert!(
            store.stats().corrupt_reads >= 2,
            "detected, retried, detected again"
        );
        // The store stays usable: the intact slots still read back.
        store.read_blocks(&[slots[0], slots[2]], |_, b| {
            assert_eq!(b, data.as_slice());
            Ok::<(), StorageError>(())
        })?;
    }
    Ok(())
}

#[test]
fn bad_requests_are_typed_errors() -> TestResult {
    let dir = ScratchDir::new("bad");
    let mut store = BlockStore::open(config(&dir, 2, 4096, IoEngine::Sync, 2))?;
    let slot = store.alloc_slot()?;
    let too_big = vec![0u8; store.slot_bytes() + 1];
    assert!(matches!(
        store.write_blocks(&[(slot, &too_big)]),
        Err(StorageError::BlockTooLarge { .. })
    ));
    let twice = store.write_blocks(&[(slot, b"a".as_slice()), (slot, b"b".as_slice())]);
    assert!(matches!(twice, Err(StorageError::InvalidSlot { .. })));
    let unwritten = store.read_blocks(&[slot], |_, _| Ok::<(), StorageError>(()));
    assert!(matches!(
        unwritten,
        Err(StorageError::InvalidSlot {
            reason: "never written",
            ..
        })
    ));
    store.write_blocks(&[(slot, b"hello".as_slice())])?;
    // A failing callback stops the read and its error comes back as is.
    #[derive(Debug)]
    enum AppError {
        Storage,
        Mine,
    }
    impl From<StorageError> for AppError {
        fn from(_: StorageError) -> Self {
            AppError::Storage
        }
    }
    let r = store.read_blocks(&[slot, slot, slot], |_, _| Err(AppError::Mine));
    assert!(matches!(r, Err(AppError::Mine)));
    let mut got = Vec::new();
    let r = store.read_blocks(&[slot], |_, b| {
        got = b.to_vec();
        Ok::<(), AppError>(())
    });
    assert!(r.is_ok() && !matches!(r, Err(AppError::Storage)));
    assert_eq!(got, b"hello");
    store.free_slot(slot)?;
    assert!(matches!(
        store.write_blocks(&[(slot, b"x".as_slice())]),
        Err(StorageError::InvalidSlot { .. })
    ));
    Ok(())
}
