//! IO backends under the store: buffer ownership while in flight, draining on drop, short
//! transfers, end of file, engine selection and the fault injector's determinism.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use common::{Rng, ScratchDir, engines};
use strata_storage::{
    Completion, FaultConfig, FaultyBackend, FileIdx, IoBackend, IoBufPool, IoEngine, SyncBackend,
    UringBackend, open_backend, open_direct, probe_io_uring,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const BUF: usize = 16384;

/// A file of `blocks` blocks of BUF bytes; block `b` is filled with byte `b + 1`.
fn data_file(dir: &ScratchDir, blocks: usize) -> Result<File, Box<dyn std::error::Error>> {
    let path = dir.path().join("data.bin");
    let bytes: Vec<u8> = (0..blocks).flat_map(|b| vec![b as u8 + 1; BUF]).collect();
    std::fs::write(&path, bytes)?;
    Ok(open_direct(&path, false)?.0)
}

fn backend(
    engine: IoEngine,
    files: Vec<File>,
    qd: usize,
    pool: &IoBufPool,
) -> Result<Box<dyn IoBackend>, Box<dyn std::error::Error>> {
    Ok(open_backend(engine, files, qd, pool)?.0)
}

fn wait_all(be: &mut dyn IoBackend) -> Result<Vec<Completion>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    while be.in_flight() > 0 {
        out.extend(be.wait(1)?);
    }
    Ok(out)
}

#[test]
fn in_flight_buffers_are_never_handed_out_and_come_back_with_data() -> TestResult {
    for engine in engines() {
        let dir = ScratchDir::new(&format!("own-{engine:?}"));
        let pool = IoBufPool::with_buffers(BUF, 4, 4096)?;
        let mut be = backend(engine, vec![data_file(&dir, 8)?], 4, &pool)?;
        for b in 0..4u64 {
            let buf = pool.take().ok_or("pool empty")?;
            be.submit_read(FileIdx(0), b * BUF as u64, buf, 100 + b)
                .map_err(|e| e.error)?;
        }
        assert_eq!(pool.available(), 0);
        assert!(
            pool.take().is_none(),
            "{engine:?}: an in-flight buffer was handed out"
        );
        assert_eq!(be.in_flight(), 4);
        let done = wait_all(be.as_mut())?;
        assert_eq!(done.len(), 4);
        for c in &done {
            let b = (c.tag - 100) as u8;
            assert_eq!(c.result.as_ref().ok(), Some(&BUF));
            assert!(
                c.buf.as_slice().iter().all(|&x| x == b + 1),
                "{engine:?}: block {b} data"
            );
        }
        assert_eq!(
            pool.available(),
            0,
            "buffers stay with the caller until dropped"
        );
        drop(done);
        assert_eq!(pool.available(), 4);
    }
    Ok(())
}

#[test]
fn dropping_a_backend_with_reads_in_flight_drains_them_first() -> TestResult {
    for engine in engines() {
        let dir = ScratchDir::new(&format!("drain-{engine:?}"));
        let pool = IoBufPool::with_buffers(BUF, 8, 4096)?;
        let mut be = backend(engine, vec![data_file(&dir, 8)?], 8, &pool)?;
        for b in 0..8u64 {
            let buf = pool.take().ok_or("pool empty")?;
            be.submit_read(FileIdx(0), b * BUF as u64, buf, b)
                .map_err(|e| e.error)?;
        }
        drop(be);
        assert_eq!(
            pool.available(),
            8,
            "{engine:?}: every buffer back after the drain"
        );
    }
    Ok(())
}

/// A pipe as file 0: reads on it complete only when the test writes.
fn pipe_file() -> Result<(File, std::io::PipeWriter), Box<dyn std::error::Error>> {
    let (reader, writer) = std::io::pipe()?;
    Ok((File::from(OwnedFd::from(reader)), writer))
}

fn uring_or_skip(test: &str) -> bool {
    match probe_io_uring() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("{test}: io_uring skipped: {why}");
            false
        }
    }
}

#[test]
fn abandoned_uring_read_keeps_its_buffer_until_the_kernel_completes_it() -> TestResult {
    if !uring_or_skip("abandoned read") {
        return Ok(());
    }
    let (file, mut writer) = pipe_file()?;
    let pool = IoBufPool::with_buffers(8192, 2, 4096)?;
    let mut be = UringBackend::new(vec![file], 4, &pool)?;
    let mut buf = pool.take().ok_or("pool empty")?;
    buf.as_mut_slice().fill(0xEE);
    be.submit_read(FileIdx(0), 0, buf, 1).map_err(|e| e.error)?;
    assert!(be.wait(0)?.is_empty(), "nothing to read yet");
    // The caller gives up: the backend is dropped while the kernel still owns the buffer.
    let dropper = std::thread::spawn(move || drop(be));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !dropper.is_finished(),
        "drop must wait for the in-flight read"
    );
    assert_eq!(
        pool.available(),
        1,
        "the parked buffer must not be reusable yet"
    );
    let spare = pool.take().ok_or("the free buffer")?;
    assert!(
        pool.take().is_none(),
        "only the free buffer can be handed out"
    );
    drop(spare);
    writer.write_all(&[7u8; 8192])?;
    dropper.join().map_err(|_| "dropper panicked")?;
    assert_eq!(
        pool.available(),
        2,
        "the buffer returns once its completion is reaped"
    );
    let a = pool.take().ok_or("a")?;
    let b = pool.take().ok_or("b")?;
    let filled = [&a, &b]
        .iter()
        .filter(|x| x.as_slice().iter().all(|&v| v == 7))
        .count();
    assert_eq!(
        filled, 1,
        "the kernel finished writing into the parked buffer before release"
    );
    Ok(())
}

#[test]
fn a_uring_read_the_kernel_holds_too_long_is_cancelled_and_resubmitted() -> TestResult {
    if !uring_or_skip("stalled read") {
        return Ok(());
    }
    let (file, mut writer) = pipe_file()?;
    let pool = IoBufPool::with_buffers(8192, 1, 4096)?;
    let mut be = UringBackend::new(vec![file], 1, &pool)?;
    if !be.set_stall_timeout(Duration::from_millis(100)) {
        eprintln!("stalled read: skipped: this kernel's io_uring_enter takes no timeout");
        return Ok(());
    }
    let buf = pool.take().ok_or("pool empty")?;
    be.submit_read(FileIdx(0), 0, buf, 5).map_err(|e| e.error)?;
    // Nothing arrives for a while: the read is cancelled and resubmitted, not lost or failed.
    let feeder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(450));
        writer.write_all(&[3u8; 8192])
    });
    let done = be.wait(1)?;
    feeder.join().map_err(|_| "feeder panicked")??;
    assert_eq!(done.len(), 1);
    let c = &done[0];
    assert_eq!((c.tag, c.result.as_ref().ok()), (5, Some(&8192)));
    assert!(c.buf.as_slice().iter().all(|&v| v == 3));
    assert!(be.stalls() >= 1, "the held read must have been cancelled");
    Ok(())
}

#[test]
fn short_uring_reads_are_completed_by_resubmitting_the_remainder() -> TestResult {
    if !uring_or_skip("short reads") {
        return Ok(());
    }
    let (file, mut writer) = pipe_file()?;
    let pool = IoBufPool::with_buffers(8192, 1, 4096)?;
    let mut be = UringBackend::new(vec![file], 1, &pool)?;
    let buf = pool.take().ok_or("pool empty")?;
    be.submit_read(FileIdx(0), 0, buf, 9).map_err(|e| e.error)?;
    writer.write_all(&[1u8; 3000])?; // the kernel returns a short read of 3000 bytes
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        assert!(
            be.wait(0)?.is_empty(),
            "a short read must not complete the operation"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.write_all(&[2u8; 5192])?;
    let done = be.wait(1)?;
    assert_eq!(done.len(), 1);
    let c = &done[0];
    assert_eq!((c.tag, c.result.as_ref().ok()), (9, Some(&8192)));
    assert!(c.buf.as_slice()[..3000].iter().all(|&v| v == 1));
    assert!(c.buf.as_slice()[3000..].iter().all(|&v| v == 2));
    Ok(())
}

#[test]
fn reads_past_end_of_file_return_the_bytes_there_are() -> TestResult {
    for engine in engines() {
        let dir = ScratchDir::new(&format!("eof-{engine:?}"));
        let path = dir.path().join("short.bin");
        std::fs::write(&path, vec![3u8; 6000])?;
        let file = std::fs::File::open(&path)?; // buffered: 6000 is not block-aligned
        let pool = IoBufPool::with_buffers(8192, 1, 4096)?;
        let mut be = backend(engine, vec![file], 1, &pool)?;
        be.submit_read(FileIdx(0), 0, pool.take().ok_or("empty")?, 0)
            .map_err(|e| e.error)?;
        let done = be.wait(1)?;
        assert_eq!(done[0].result.as_ref().ok(), Some(&6000), "{engine:?}");
    }
    Ok(())
}

#[test]
fn bad_submissions_hand_the_buffer_back() -> TestResult {
    for engine in engines() {
        let dir = ScratchDir::new(&format!("refuse-{engine:?}"));
        let pool = IoBufPool::with_buffers(4096, 1, 4096)?;
        let mut be = backend(engine, vec![data_file(&dir, 1)?], 1, &pool)?;
        let buf = pool.take().ok_or("empty")?;
        let refused = be
            .submit_read(FileIdx(3), 0, buf, 0)
            .err()
            .ok_or("file 3 accepted")?;
        let refused = be
            .submit_write(FileIdx(0), 0, refused.buf, 5000, 0)
            .err()
            .ok_or("len")?;
        drop(refused);
        assert_eq!(pool.available(), 1);
        assert_eq!(be.in_flight(), 0);
    }
    Ok(())
}

#[test]
fn forced_sync_engine_is_reported() -> TestResult {
    let dir = ScratchDir::new("forced");
    let pool = IoBufPool::with_buffers(4096, 1, 4096)?;
    let (be, why) = open_backend(IoEngine::Sync, vec![data_file(&dir, 1)?], 2, &pool)?;
    assert_eq!(be.name(), "sync");
    assert!(why.starts_with("sync"), "{why}");
    let (be, why) = open_backend(IoEngine::Auto, vec![data_file(&dir, 1)?], 2, &pool)?;
    eprintln!("auto engine here: {} ({why})", be.name());
    Ok(())
}

/// `(tag, bytes, most frequent byte's count)`; a failed read's buffer is not looked at.
fn outcome(c: &Completion) -> (u64, Option<usize>, usize) {
    let n = c.result.as_ref().ok().copied();
    let mut counts = [0usize; 256];
    for &v in &c.buf.as_slice()[..n.unwrap_or(0)] {
        counts[v as usize] += 1;
    }
    (c.tag, n, counts.into_iter().max().unwrap_or(0))
}

/// Runs the same reads through two fault injectors with the same seed: same outcomes.
#[test]
fn fault_injection_is_deterministic_for_a_seed() -> TestResult {
    let dir = ScratchDir::new("determinism");
    let cfg: FaultConfig = "seed=11,eio=0.2,short=0.2,corrupt=0.2,latency_ms=1:0.3".parse()?;
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let pool = IoBufPool::with_buffers(BUF, 4, 4096)?;
        let inner = Box::new(SyncBackend::new(vec![data_file(&dir, 8)?], 4)?);
        let mut be = FaultyBackend::new(inner, cfg.clone());
        assert_eq!(be.name(), "faulty(sync)");
        let mut rng = Rng::new(3);
        let mut seen = Vec::new();
        for op in 0..64u64 {
            let buf = pool.take().ok_or("empty")?;
            let block = rng.below(8) as u64;
            be.submit_read(FileIdx(0), block * BUF as u64, buf, op)
                .map_err(|e| e.error)?;
            let min = usize::from(pool.available() == 0);
            seen.extend(be.wait(min)?.iter().map(outcome));
        }
        seen.extend(wait_all(&mut be)?.iter().map(outcome));
        seen.sort_unstable();
        outcomes.push(seen);
    }
    assert_eq!(outcomes[0], outcomes[1]);
    let faults = outcomes[0]
        .iter()
        .filter(|(_, r, same)| *r != Some(BUF) || *same != BUF);
    assert!(faults.count() > 10, "faults were injected");
    Ok(())
}
