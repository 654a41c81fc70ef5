//! strata's benchmarks. Until `strata bench` exists (benchmark issue), this crate holds the
//! tier benchmarks as binaries:
//! - `tier-attention`: host and storage attention throughput against memcpy and disk-read
//!   bandwidth measured in the same run.
//!
//! CPU decode figures come from `bench/cpu-decode.sh` (`strata generate --stats-json`). Results
//! are recorded in `RESULTS.md`.
