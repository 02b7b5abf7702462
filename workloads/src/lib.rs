//! Guest I/O for cbtsim: synthetic workloads, real block traces, and a shadow model that
//! says what a changed-block tracker must report.
//!
//! - [`IoOp`] is one guest operation (write, read, unmap, flush, extend). A write carries a
//!   seed, and [`fill_pattern`] turns `(seed, offset)` into its bytes, so a run can be
//!   replayed and checked without storing data.
//! - [`Distribution`] (fio's `uniform`, `zipf:θ`, `pareto:h`, `normal:dev[:center]`,
//!   `zoned:...`) picks blocks; [`GeneratorConfig`] and [`Generator`] combine it with an op
//!   mix, a block-size mix ([`SizeMix`], fio's `bssplit`), sequential streams, alignment
//!   and flushes into a [`Workload`].
//! - [`profile`] makes the named guests listed by [`profiles`] (`os-idle`, `oltp-db`,
//!   `file-server`, `vdi`, `log-append`, `legacy-misaligned`, `cloud-mixed`, `edge-cases`),
//!   reproducible from a seed, with independent streams per vCPU thread.
//! - [`TraceReader`] streams public block traces ([`TraceFormat`]: MSR Cambridge,
//!   CloudPhysics vscsi and CSV, blkparse, fio iolog, Alibaba, Tencent CBS) as
//!   [`TraceRecord`]s.
//! - [`size`] reads and writes byte sizes (`64K`, `2TiB`; `1.5 GiB`): the one size
//!   grammar and printer of the workspace, used by the command line, the scenarios and the
//!   benchmarks too.
//! - [`ShadowDisk`] records what each byte should hold and what changed between
//!   checkpoints; [`check_report`] compares a tracker's changed areas with that truth.
//!
//! Every op a workload makes lies inside the disk it knows, is non-empty and is a whole
//! number of 512-byte sectors.
//!
//! # Example
//! Run a profile, keep the shadow in step, and check a (here perfect) tracker's report:
//!
//! ```
//! use workloads::{check_report, profile, IoOp, ShadowDisk};
//!
//! let disk_size = 1 << 30;
//! let mut guest = profile("oltp-db", disk_size, 42, 0)?;
//! let mut shadow = ShadowDisk::new(disk_size);
//! let before = shadow.checkpoint();
//! for _ in 0..10_000 {
//!     let op = guest.next_op();
//!     // ... submit `op` to the simulated disk here ...
//!     shadow.apply(&op)?;
//! }
//! let after = shadow.checkpoint();
//!
//! // What a tracker with 64 KiB blocks must report (at least) between the two points.
//! let must = shadow.changed_between(before, after, 64 * 1024)?;
//! let reported = must.clone(); // the tracker's answer
//! let verdict = check_report(&must, &reported, 64 * 1024);
//! assert_eq!(verdict.missed_blocks, 0);
//!
//! // The bytes a backup must copy for the first changed area.
//! let (start, len) = must[0];
//! let bytes = shadow.expected(start, len.min(4096));
//! assert_eq!(bytes.len() as u64, len.min(4096));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod dist;
mod error;
mod gen;
mod op;
mod profiles;
mod shadow;
pub mod size;
mod trace;

pub use dist::{Distribution, Sampler, Zone};
pub use error::WorkloadError;
pub use gen::{Generator, GeneratorConfig, SizeMix, Workload, SECTOR};
pub use op::{fill_pattern, IoOp};
pub use profiles::{profile, profiles, ProfileInfo, MIN_DISK_SIZE};
pub use shadow::{check_report, CheckpointId, ShadowDisk, ShadowError, Verdict};
pub use size::{format_size, human, parse_size, SizeError, SizeStyle};
pub use trace::{TraceError, TraceFormat, TraceOpKind, TraceReader, TraceRecord};
