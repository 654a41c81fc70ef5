//! The portable backend: a pool of worker threads doing `pread`/`pwrite`, used when io_uring is
//! unavailable or when `STRATA_IO_ENGINE=sync` / `--io-engine sync` forces it.
//!
//! `queue_depth` worker threads (at most 64) take requests from one channel and post completions
//! on another, so up to `queue_depth` operations run at once, like fio's `psync` with that many
//! jobs. Invariants: a request's buffer is owned by the channel or by exactly one worker until
//! its completion is posted; EINTR/EAGAIN are retried and short transfers continued in the
//! worker; dropping the backend closes the request channel, joins the workers (which finish every
//! queued request first) and only then drops the completions, so no buffer is released while a
//! worker may still touch it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::{
    Completion, FileIdx, IoBackend, IoDir, MAX_TRANSIENT_RETRIES, check_submit, is_transient,
};
use crate::error::{StorageError, SubmitError};
use crate::pool::IoBuf;

const MAX_WORKERS: usize = 64;

struct Request {
    write: bool,
    file: FileIdx,
    offset: u64,
    buf: IoBuf,
    len: usize,
    tag: u64,
}

/// pread/pwrite thread pool. See the module header.
pub struct SyncBackend {
    file_count: usize,
    requests: Option<Sender<Request>>, // None only during drop
    completions: Receiver<Completion>,
    workers: Vec<JoinHandle<()>>,
    in_flight: usize,
}

impl SyncBackend {
    /// Starts `queue_depth` (1..=64) worker threads over `files`.
    pub fn new(files: Vec<File>, queue_depth: usize) -> Result<SyncBackend, StorageError> {
        let file_count = files.len();
        let files = Arc::new(files);
        let (req_tx, req_rx) = crossbeam_channel::unbounded::<Request>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Completion>();
        let mut workers = Vec::new();
        for n in 0..queue_depth.clamp(1, MAX_WORKERS) {
            let (files, req_rx, done_tx) = (Arc::clone(&files), req_rx.clone(), done_tx.clone());
            let worker = std::thread::Builder::new()
                .name(format!("strata-io-{n}"))
                .spawn(move || worker_loop(&files, &req_rx, &done_tx))
                .map_err(|source| StorageError::Ring {
                    op: "spawn IO worker",
                    source,
                })?;
            workers.push(worker);
        }
        Ok(SyncBackend {
            file_count,
            requests: Some(req_tx),
            completions: done_rx,
            workers,
            in_flight: 0,
        })
    }
}

fn worker_loop(files: &[File], requests: &Receiver<Request>, done: &Sender<Completion>) {
    while let Ok(mut req) = requests.recv() {
        let file = &files[req.file.0 as usize];
        let result = transfer(file, req.write, &mut req.buf, req.len, req.offset);
        let completion = Completion {
            tag: req.tag,
            result,
            buf: req.buf,
        };
        if done.send(completion).is_err() {
            return;
        }
    }
}

/// Transfers `len` bytes, retrying EINTR/EAGAIN and continuing short transfers; a zero-byte
/// transfer (end of file) ends early with the count so far.
fn transfer(
    file: &File,
    write: bool,
    buf: &mut IoBuf,
    len: usize,
    offset: u64,
) -> io::Result<usize> {
    let mut done = 0;
    let mut retries = 0;
    while done < len {
        let at = offset + done as u64;
        let step = if write {
            file.write_at(&buf.as_slice()[done..len], at)
        } else {
            file.read_at(&mut buf.as_mut_slice()[done..len], at)
        };
        match step {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e)
                if e.raw_os_error().is_some_and(is_transient)
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                retries += 1;
                if retries > MAX_TRANSIENT_RETRIES {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl IoBackend for SyncBackend {
    fn name(&self) -> &'static str {
        "sync"
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
        let buf = check_submit(self.file_count, file, buf, len)?;
        let Some(requests) = self.requests.as_ref() else {
            return Err(SubmitError::new(StorageError::WorkersGone, buf));
        };
        let request = Request {
            write,
            file,
            offset,
            buf,
            len,
            tag,
        };
        match requests.send(request) {
            Ok(()) => {
                self.in_flight += 1;
                Ok(())
            }
            Err(crossbeam_channel::SendError(r)) => {
                Err(SubmitError::new(StorageError::WorkersGone, r.buf))
            }
        }
    }

    fn wait(&mut self, min: usize) -> Result<Vec<Completion>, StorageError> {
        let min = min.min(self.in_flight);
        let mut out = Vec::with_capacity(min);
        while out.len() < min {
            match self.completions.recv() {
                Ok(c) => out.push(c),
                Err(_) => {
                    self.in_flight -= out.len();
                    return Err(StorageError::WorkersGone);
                }
            }
        }
        out.extend(self.completions.try_iter());
        self.in_flight -= out.len();
        Ok(out)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl Drop for SyncBackend {
    fn drop(&mut self) {
        // Close the request channel: workers finish every queued request, then exit.
        self.requests = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        // Only now release the buffers of unreaped completions (the receiver drops last).
        self.completions.try_iter().for_each(drop);
    }
}
