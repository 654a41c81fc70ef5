//! strata's NVMe tier: IO backends (io_uring, a pread/pwrite pool, fault injection), the host
//! arena and the block store. Empty until the tiering issue lands; the crate exists so the
//! workspace has the layout DESIGN.md gives and the dependency rules hold from the start.
