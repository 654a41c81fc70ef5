//! strata's benchmarks: workloads, baselines and reports. The `strata bench` command arrives with
//! the benchmark issue; until then the CPU decode figures in `RESULTS.md` come from
//! `strata generate --stats-json` (see that file for the commands).
