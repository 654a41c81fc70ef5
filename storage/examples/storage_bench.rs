//! Disk bandwidth of strata's IO backends: sequential and random reads and writes with O_DIRECT,
//! per engine, block size and queue depth, printed as a Markdown table of GB/s (10^9 bytes/s).
//!
//! ```text
//! cargo run --release -p strata-storage --example storage_bench -- --dir /nvme/strata --size 1GiB
//! ```
//!
//! Options (defaults in brackets): `--dir D` (required), `--size S` [1GiB] file size,
//! `--engines uring,sync`, `--bs 256K,1M,2M`, `--qd 1,4,16,32`,
//! `--patterns read,randread,write,randwrite`, `--seconds T` [1] per cell (time based, cycling
//! over the file), `--format md|tsv` [md], `--keep` (leave `D/strata-bench.dat` for fio),
//! `--no-fill` (reuse a kept file of the right size). The file is filled with data first, so
//! reads hit the device rather than unwritten extents.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use strata_storage::{FileIdx, IoBackend, IoBufPool, IoEngine, open_backend, open_direct};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Args {
    dir: PathBuf,
    size: u64,
    engines: Vec<IoEngine>,
    block_sizes: Vec<usize>,
    depths: Vec<usize>,
    patterns: Vec<String>,
    seconds: f64,
    tsv: bool,
    keep: bool,
    no_fill: bool,
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        other => return Err(format!("size {s:?}: unknown unit {other:?}").into()),
    };
    Ok((num.parse::<f64>()? * (1u64 << shift) as f64) as u64)
}

fn list<T>(s: &str, f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    s.split(',').filter(|x| !x.is_empty()).map(f).collect()
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        dir: PathBuf::new(),
        size: 1 << 30,
        engines: vec![IoEngine::Uring, IoEngine::Sync],
        block_sizes: vec![256 << 10, 1 << 20, 2 << 20],
        depths: vec![1, 4, 16, 32],
        patterns: ["read", "randread", "write", "randwrite"]
            .map(String::from)
            .to_vec(),
        seconds: 1.0,
        tsv: false,
        keep: false,
        no_fill: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(value()?),
            "--size" => args.size = parse_size(&value()?)?,
            "--engines" => args.engines = list(&value()?, |e| Ok(e.parse()?))?,
            "--bs" => args.block_sizes = list(&value()?, |b| Ok(parse_size(b)? as usize))?,
            "--qd" => args.depths = list(&value()?, |q| Ok(q.parse()?))?,
            "--patterns" => args.patterns = list(&value()?, |p| Ok(p.to_string()))?,
            "--seconds" => args.seconds = value()?.parse()?,
            "--format" => args.tsv = value()? == "tsv",
            "--keep" => args.keep = true,
            "--no-fill" => args.no_fill = true,
            other => return Err(format!("unknown option {other} (see the file header)").into()),
        }
    }
    if args.dir.as_os_str().is_empty() {
        return Err("--dir is required".into());
    }
    Ok(args)
}

/// Offsets of one run: sequential, or a seeded permutation of the blocks.
fn offsets(blocks: u64, bs: usize, random: bool) -> Vec<u64> {
    let mut order: Vec<u64> = (0..blocks).collect();
    if random {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for i in (1..order.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            order.swap(i, (state % (i as u64 + 1)) as usize);
        }
    }
    order.into_iter().map(|b| b * bs as u64).collect()
}

/// Keeps `qd` operations in flight for `budget`, cycling through `offsets`; returns GB/s.
fn run_cell(
    be: &mut dyn IoBackend,
    pool: &IoBufPool,
    offsets: &[u64],
    write: bool,
    budget: Duration,
) -> Result<f64> {
    let bs = pool.buf_bytes();
    let start = Instant::now();
    let (mut next, mut bytes) = (0usize, 0u64);
    loop {
        while start.elapsed() < budget {
            let Some(buf) = pool.take() else { break };
            let off = offsets[next % offsets.len()];
            let sent = if write {
                be.submit_write(FileIdx(0), off, buf, bs, next as u64)
            } else {
                be.submit_read(FileIdx(0), off, buf, next as u64)
            };
            sent.map_err(|e| e.error)?;
            next += 1;
        }
        if be.in_flight() == 0 {
            break;
        }
        for c in be.wait(1)? {
            bytes += c.result? as u64;
        }
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e9)
}

fn fill(path: &std::path::Path, size: u64) -> Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let (file, direct) = open_direct(path, false)?;
    if !direct {
        eprintln!(
            "warning: {} does not support O_DIRECT; numbers include the page cache",
            path.display()
        );
    }
    file.set_len(size)?;
    let pool = IoBufPool::with_buffers(2 << 20, 16, 4096)?;
    let (mut be, _) = open_backend(IoEngine::Auto, vec![file], 16, &pool)?;
    let start = Instant::now();
    let mut submitted = 0u64;
    while submitted < size || be.in_flight() > 0 {
        while submitted < size {
            let Some(buf) = pool.take() else { break };
            let len = buf.len().min((size - submitted) as usize);
            be.submit_write(FileIdx(0), submitted, buf, len, 0)
                .map_err(|e| e.error)?;
            submitted += len as u64;
        }
        for c in be.wait(1)? {
            c.result?;
        }
    }
    let gbps = size as f64 / start.elapsed().as_secs_f64() / 1e9;
    eprintln!("filled {} ({gbps:.2} GB/s)", path.display());
    Ok(())
}

fn engine_name(e: IoEngine) -> &'static str {
    match e {
        IoEngine::Uring => "io_uring",
        IoEngine::Sync => "sync",
        IoEngine::Auto => "auto",
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.dir)?;
    let path = args.dir.join("strata-bench.dat");
    let filled = std::fs::metadata(&path).is_ok_and(|m| m.len() == args.size);
    if !(args.no_fill && filled) {
        fill(&path, args.size)?;
    }
    let budget = Duration::from_secs_f64(args.seconds);
    let mut rows = Vec::new();
    for &engine in &args.engines {
        for pattern in &args.patterns {
            for &bs in &args.block_sizes {
                let mut cells = Vec::new();
                for &qd in &args.depths {
                    let pool = IoBufPool::with_buffers(bs, qd, 4096)?;
                    let file = open_direct(&path, false)?.0;
                    let (mut be, _) = match open_backend(engine, vec![file], qd, &pool) {
                        Ok(b) => b,
                        Err(e) => {
                            eprintln!("{}: skipped ({e})", engine_name(engine));
                            cells.push(f64::NAN);
                            continue;
                        }
                    };
                    let offs = offsets(args.size / bs as u64, bs, pattern.starts_with("rand"));
                    let write = pattern.ends_with("write");
                    let gbps = run_cell(be.as_mut(), &pool, &offs, write, budget)?;
                    if args.tsv {
                        println!("{}\t{pattern}\t{bs}\t{qd}\t{gbps:.3}", engine_name(engine));
                    }
                    cells.push(gbps);
                }
                rows.push((engine_name(engine), pattern.clone(), bs, cells));
            }
        }
    }
    if !args.tsv {
        print_table(&args, &rows);
    }
    if !args.keep {
        std::fs::remove_file(&path)?;
    }
    Ok(())
}

fn print_table(args: &Args, rows: &[(&str, String, usize, Vec<f64>)]) {
    let heads: Vec<String> = args.depths.iter().map(|q| format!("QD {q}")).collect();
    println!("| engine | pattern | block | {} |", heads.join(" | "));
    println!("|---|---|---|{}", "---:|".repeat(heads.len()));
    for (engine, pattern, bs, cells) in rows {
        let cells: Vec<String> = cells.iter().map(|g| format!("{g:.2}")).collect();
        println!(
            "| {engine} | {pattern} | {} KiB | {} |",
            bs >> 10,
            cells.join(" | ")
        );
    }
    println!(
        "\nGB/s (10^9 bytes/s), O_DIRECT, {} file, {} s per cell",
        strata_storage::fmt_bytes(args.size),
        args.seconds
    );
}
