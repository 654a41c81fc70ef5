//! Typed errors of the planner. Messages name what a user must change: the file and field of a
//! bad profile, the tier that is short and by how many bytes.

use std::fmt;
use std::path::PathBuf;

use crate::policy::Tier;

/// One tier's shortfall in the closest-fitting policy considered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub tier: Tier,
    /// Bytes the closest policy needs on this tier.
    pub needed_bytes: u64,
    /// The budget given for this tier.
    pub budget_bytes: u64,
}

impl Shortfall {
    pub fn short_bytes(&self) -> u64 {
        self.needed_bytes.saturating_sub(self.budget_bytes)
    }
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} memory is short by {} (needs {}, budget {})",
            self.tier.name(),
            human_bytes(self.short_bytes()),
            human_bytes(self.needed_bytes),
            human_bytes(self.budget_bytes)
        )
    }
}

fn list(shortfalls: &[Shortfall]) -> String {
    shortfalls
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("invalid {field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    #[error(
        "no policy fits the budgets: {} (closest of {considered} policies considered; raise that budget or shrink the batch or lengths)",
        list(.shortfalls)
    )]
    NothingFits {
        shortfalls: Vec<Shortfall>,
        considered: u64,
    },
    #[error("invalid policy: {0}")]
    InvalidPolicy(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read hardware profile {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write hardware profile {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("hardware profile {path} is not valid profile JSON: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "hardware profile {path} has version {found}, this strata reads version {expected}; measure the machine again"
    )]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("hardware profile {path}: field `{field}` must be {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        reason: &'static str,
    },
}

/// `1.50 GiB`-style rendering for messages (powers of 1024).
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", units[i])
    }
}
