//! The harness shared by cbtsim's benchmark binaries (`overhead`, `mark`,
//! `retained`, `query`, `memory`); `benches/README.md` states each scenario,
//! its parameters, the method and the latest figures.
//!
//! * The data path every write-path benchmark uses is `sim`'s own:
//!   [`sim::Vm::write_with`] runs the real write path (I/O gate, checks, mark,
//!   copy into the disk's memory-mapped sparse extent) marking the tracker
//!   under test; with `()` it is "tracking off" ([`writepath::BenchVm`]).
//! * [`baselines`]: the trackers ours is compared with, as `MarkDirty`
//!   implementations: a bitmap behind a mutex (QEMU's dirty-bitmap mutex), a
//!   bitmap per retained change ID all set on every write (libvirt checkpoints
//!   over QEMU), and a naive lock-free bitmap that `fetch_or`s unconditionally.
//! * [`variant`]: one enum over all of them, so a round dispatches once and
//!   the per-write loop is monomorphised for each tracker.
//! * [`pool`]: A/B interleaving: alternate short rounds of every variant on
//!   the same worker threads, so machine drift hits all of them alike.
//! * [`writepath`]: the write streams and the interleaved write-path run
//!   that `overhead` and `retained` share.
//! * [`report`]: a human table, or with `--json` one JSON object per line.
//!
//! # Example
//! ```
//! use benches::writepath::BenchVm;
//!
//! let bench = BenchVm::create(&std::env::temp_dir(), 1 << 30, 64 << 10)?;
//! bench.vm.write_with(&(), 0, 4096, &[1u8; 4096])?; // tracking off: the same path, no-op marker
//! let stats = benches::stats::median(&mut [3.0, 1.0, 2.0]);
//! assert_eq!(stats, 2.0);
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod baselines;
pub mod charts;
pub mod cli;
pub mod pool;
pub mod report;
pub mod rng;
pub mod stats;
pub mod variant;
pub mod writepath;

/// Bytes in a KiB.
pub const KIB: u64 = 1 << 10;
/// Bytes in a MiB.
pub const MIB: u64 = 1 << 20;
/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;
/// Bytes in a TiB.
pub const TIB: u64 = 1 << 40;

/// A size in the benchmarks' tables: [`SizeStyle::Short`](workloads::SizeStyle::Short)
/// (`64G`, `1T`, `4K`), which the size options read back.
pub fn human_size(bytes: u64) -> String {
    workloads::format_size(bytes, workloads::SizeStyle::Short)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(4096), "4K");
        assert_eq!(human_size(64 * GIB), "64G");
        assert_eq!(human_size(62 * TIB), "62T");
        assert_eq!(human_size(1536 * MIB), "1536M");
        // Exact, so that `--size` reads it back (it printed `1.0G` before the sizes of the
        // workspace had one printer).
        assert_eq!(human_size(GIB + 1), "1073741825");
        assert_eq!(cli::parse_size(&human_size(GIB + 1)), Ok(GIB + 1));
        assert_eq!(human_size(100), "100");
    }
}
