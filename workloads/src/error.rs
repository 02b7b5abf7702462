//! The error of workload construction.

use thiserror::Error;

/// Why a workload, a distribution or a generator configuration could not be built.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// A distribution string such as `zipf:0.99` is malformed or out of range.
    #[error("invalid distribution {spec:?}: {reason}")]
    BadDistribution {
        /// The string as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A block size mix such as `4k/50:8k/50` is malformed or out of range.
    #[error("invalid block size mix {spec:?}: {reason}")]
    BadSizeMix {
        /// The string as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A generator configuration is inconsistent.
    #[error("invalid generator configuration: {0}")]
    BadConfig(String),
    /// The disk size is not usable for the workload.
    #[error("disk size {size} is not usable: {reason}")]
    BadDiskSize {
        /// The size given, in bytes.
        size: u64,
        /// Why it cannot be used.
        reason: String,
    },
    /// No profile has this name.
    #[error("unknown workload profile {name:?} (known: {known})")]
    UnknownProfile {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
}
