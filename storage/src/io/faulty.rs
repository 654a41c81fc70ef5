//! A fault-injecting backend that wraps another (TigerBeetle's simulator idea): seeded, so a
//! failing run replays exactly, and configurable per fault kind.
//!
//! Specification string (env var `STRATA_FAULTS`, or [`FaultConfig::from_str`]): comma-separated
//! `key=value` pairs, every key optional:
//!
//! | key | value | effect |
//! |---|---|---|
//! | `seed` | integer | RNG seed (default 0) |
//! | `eio` | rate in [0,1] | the operation fails with EIO without reaching the disk |
//! | `short` | rate | a read reports half its bytes; a write writes and reports half |
//! | `enospc` | rate | a write fails with ENOSPC without reaching the disk |
//! | `latency_ms` | `MS:RATE` | the completion is held back `MS` milliseconds |
//! | `corrupt` | rate | one byte of a completed read is flipped (the data, not the result) |
//!
//! Example: `STRATA_FAULTS="seed=7,eio=0.01,short=0.05,enospc=0,latency_ms=2:0.1,corrupt=0.01"`.
//!
//! Invariants: every decision is drawn at submission from an RNG seeded by `(seed, file, offset,
//! direction, n)` where `n` counts earlier operations on that location, so the n-th read of a
//! block gets the same faults whatever the interleaving of other operations (retries included);
//! buffers keep the ownership contract of [`IoBackend`] (held-back and failed
//! operations keep their buffer until `wait` returns it); the wrapped backend is dropped (and so
//! drained) before held buffers are released.

use std::collections::HashMap;
use std::io;
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::{Completion, FileIdx, IoBackend, IoDir};
use crate::error::{StorageError, SubmitError};
use crate::pool::IoBuf;

/// Environment variable holding a fault specification.
pub const FAULTS_ENV: &str = "STRATA_FAULTS";

/// Injected short transfers are cut to a multiple of this (keeps O_DIRECT lengths aligned).
const SHORT_ALIGN: usize = 4096;

/// Fault rates per kind (probabilities per operation) and the RNG seed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultConfig {
    pub seed: u64,
    pub eio: f64,
    pub short: f64,
    pub enospc: f64,
    pub latency_ms: u64,
    pub latency: f64,
    pub corrupt: f64,
}

impl FaultConfig {
    /// Parses a specification string (format in the module header).
    pub fn parse(spec: &str) -> Result<FaultConfig, StorageError> {
        spec.parse()
    }

    /// Reads [`FAULTS_ENV`]; `Ok(None)` when unset or empty.
    pub fn from_env() -> Result<Option<FaultConfig>, StorageError> {
        match std::env::var(FAULTS_ENV) {
            Ok(spec) if !spec.trim().is_empty() => spec.parse().map(Some),
            _ => Ok(None),
        }
    }
}

impl FromStr for FaultConfig {
    type Err = StorageError;
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| StorageError::FaultSpec {
            spec: spec.to_string(),
            reason,
        };
        let rate = |key: &str, v: &str| match v.trim().parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
            _ => Err(err(format!("{key}={v}: expected a rate between 0 and 1"))),
        };
        let mut cfg = FaultConfig::default();
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| err(format!("{pair:?} is not key=value")))?;
            match key.trim() {
                "seed" => {
                    cfg.seed = value
                        .trim()
                        .parse()
                        .map_err(|_| err(format!("seed={value}")))?
                }
                "eio" => cfg.eio = rate(key, value)?,
                "short" => cfg.short = rate(key, value)?,
                "enospc" => cfg.enospc = rate(key, value)?,
                "corrupt" => cfg.corrupt = rate(key, value)?,
                "latency_ms" => {
                    let (ms, r) = value.split_once(':').unwrap_or((value, "1"));
                    cfg.latency_ms = ms
                        .trim()
                        .parse()
                        .map_err(|_| err(format!("latency_ms={value}: expected MS:RATE")))?;
                    cfg.latency = rate(key, r)?;
                }
                other => return Err(err(format!("unknown key {other:?}"))),
            }
        }
        Ok(cfg)
    }
}

/// splitmix64's finalizer: a bijective 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What was decided for one operation.
#[derive(Clone, Copy, Default)]
struct Fault {
    short_to: Option<usize>, // report (and for writes, transfer) only this many bytes
    corrupt_at: Option<u64>, // flip the byte at this position modulo the bytes read
    delay: bool,
}

struct Pending {
    tag: u64,
    fault: Fault,
}

/// Wraps a backend and injects faults. See the module header.
pub struct FaultyBackend {
    inner: Box<dyn IoBackend>,
    cfg: FaultConfig,
    rng: u64,                                     // state of the current operation's draws
    per_location: HashMap<(u32, u64, bool), u64>, // (file, offset, write) → operations so far
    next_tag: u64,
    pending: HashMap<u64, Pending>, // inner tag → caller's tag and decided fault
    ready: Vec<Completion>,
    held: Vec<(Instant, Completion)>, // latency-injected, released at the instant
}

impl FaultyBackend {
    pub fn new(inner: Box<dyn IoBackend>, cfg: FaultConfig) -> FaultyBackend {
        FaultyBackend {
            inner,
            cfg,
            rng: 0,
            per_location: HashMap::new(),
            next_tag: 0,
            pending: HashMap::new(),
            ready: Vec::new(),
            held: Vec::new(),
        }
    }

    /// splitmix64: a uniform u64.
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.rng)
    }

    fn roll(&mut self, rate: f64) -> bool {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        u < rate
    }

    /// Draws every decision for one operation on `(file, offset)`.
    fn decide(
        &mut self,
        file: FileIdx,
        offset: u64,
        write: bool,
        len: usize,
    ) -> (Option<i32>, Fault) {
        let n = self
            .per_location
            .entry((file.0, offset, write))
            .or_insert(0);
        *n += 1;
        let key = [
            self.cfg.seed,
            u64::from(file.0),
            offset,
            u64::from(write),
            *n,
        ];
        self.rng = key.iter().fold(0x5EED_F0F0_1234_5678, |h, &k| mix(h ^ k));
        let (eio, enospc) = (self.roll(self.cfg.eio), self.roll(self.cfg.enospc));
        let short = self.roll(self.cfg.short);
        let corrupt = self.roll(self.cfg.corrupt);
        let delay = self.roll(self.cfg.latency) && self.cfg.latency_ms > 0;
        let corrupt_pos = self.next_u64();
        let errno = match (eio, write && enospc) {
            (true, _) => Some(libc::EIO),
            (false, true) => Some(libc::ENOSPC),
            _ => None,
        };
        let cut = (len / 2) / SHORT_ALIGN * SHORT_ALIGN;
        let fault = Fault {
            short_to: (short && cut > 0).then_some(cut),
            corrupt_at: (corrupt && !write).then_some(corrupt_pos),
            delay,
        };
        (errno, fault)
    }

    /// Applies the decided faults to inner completions; parks delayed ones.
    fn absorb(&mut self, completions: Vec<Completion>) {
        for mut c in completions {
            let Some(Pending { tag, fault }) = self.pending.remove(&c.tag) else {
                tracing::error!("faulty backend: completion for unknown operation {}", c.tag);
                continue;
            };
            c.tag = tag;
            if let Ok(n) = c.result {
                if let Some(pos) = fault.corrupt_at.filter(|_| n > 0) {
                    c.buf.as_mut_slice()[(pos % n as u64) as usize] ^= 0xA5;
                }
                if let Some(cut) = fault.short_to {
                    c.result = Ok(n.min(cut));
                }
            }
            if fault.delay {
                let due = Instant::now() + Duration::from_millis(self.cfg.latency_ms);
                self.held.push((due, c));
            } else {
                self.ready.push(c);
            }
        }
    }

    fn release_due(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.ready);
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.held = later;
        out.extend(due.into_iter().map(|(_, c)| c));
    }
}

impl IoBackend for FaultyBackend {
    fn name(&self) -> &'static str {
        match self.inner.name() {
            "io_uring" => "faulty(io_uring)",
            "sync" => "faulty(sync)",
            _ => "faulty(faulty)",
        }
    }

    fn submit(
        &mut self,
        dir: IoDir,
        file: FileIdx,
        offset: u64,
        buf: IoBuf,
        len: usize,
        tag: u64,
    ) -> Result<(), SubmitError> {
        let write = dir == IoDir::Write;
        let (errno, fault) = self.decide(file, offset, write, len);
        if let Some(errno) = errno {
            let result = Err(io::Error::from_raw_os_error(errno));
            self.ready.push(Completion { tag, result, buf });
            return Ok(());
        }
        let inner_tag = self.next_tag;
        self.next_tag += 1;
        let submitted = if write {
            let len = fault.short_to.unwrap_or(len);
            self.inner.submit_write(file, offset, buf, len, inner_tag)
        } else {
            self.inner.submit_read(file, offset, buf, inner_tag)
        };
        submitted?;
        self.pending.insert(inner_tag, Pending { tag, fault });
        Ok(())
    }

    fn wait(&mut self, min: usize) -> Result<Vec<Completion>, StorageError> {
        let min = min.min(self.in_flight());
        let mut out = Vec::new();
        loop {
            let polled = self.inner.wait(0)?;
            self.absorb(polled);
            self.release_due(&mut out);
            if out.len() >= min {
                return Ok(out);
            }
            let earliest = self.held.iter().map(|(at, _)| *at).min();
            match (self.inner.in_flight() > 0, earliest) {
                (true, None) => {
                    let got = self.inner.wait(1)?;
                    self.absorb(got);
                }
                (inner_busy, Some(at)) => {
                    let mut nap = at.saturating_duration_since(Instant::now());
                    if inner_busy {
                        nap = nap.min(Duration::from_micros(200));
                    }
                    std::thread::sleep(nap);
                }
                (false, None) => return Ok(out),
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.ready.len() + self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_every_key() -> Result<(), StorageError> {
        let cfg: FaultConfig =
            "seed=7,eio=0.01,short=0.05,enospc=0,latency_ms=2:0.1,corrupt=0.01".parse()?;
        let want = FaultConfig {
            seed: 7,
            eio: 0.01,
            short: 0.05,
            enospc: 0.0,
            latency_ms: 2,
            latency: 0.1,
            corrupt: 0.01,
        };
        assert_eq!(cfg, want);
        assert_eq!("".parse::<FaultConfig>()?, FaultConfig::default());
        Ok(())
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        for bad in ["eio=2", "eio", "bogus=1", "latency_ms=x:0.5", "seed=-1"] {
            let err = bad.parse::<FaultConfig>().err().map(|e| e.to_string());
            assert!(
                err.is_some_and(|e| e.contains(bad)),
                "{bad} should be refused"
            );
        }
    }
}
