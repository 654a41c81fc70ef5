//! strata's planner: model spec + workload + budgets + hardware profile → a frozen, serialisable
//! [`Policy`] and a predicted time breakdown per stream ([`Prediction`]).
//!
//! Pure: no CUDA, no threads, and no IO except [`HardwareProfile::load`] / [`HardwareProfile::save`],
//! the thin edge that reads and writes the profile file `strata calibrate` will produce.
//!
//! - [`model`]: what the planner knows of a model and a job (bytes, FLOPs, KV and hidden-state
//!   bytes per token; batch and lengths; per-tier budgets).
//! - [`profile`]: the measured (or reference) hardware profile, versioned JSON.
//! - [`policy`]: the policy space — policy as data, validated, interpreted by one executor.
//! - [`cost`]: the overlap-aware cost model and the memory footprint of a policy.
//! - [`search`]: enumeration of a discretised policy space, feasibility, best + runners-up.
//! - [`fill`]: moving a policy's cold KV up into the room its budgets leave on faster tiers.
//! - [`flexgen`]: FlexGen's policy space (its `Policy`, published suite, search with this cost
//!   model) translated into strata policies: the `flexgen` baseline of `strata bench`.
//! - [`baselines`]: the `layerwise` and `gpu-only` baselines.
//!
//! Invariants: every policy [`plan`] returns fits the budgets under [`cost::memory`]; the cost model
//! never looks at the budgets, so more memory in any tier can only enlarge the feasible set (and
//! give the filled policies more of the faster tiers) and never predicts a slower plan.

pub mod baselines;
pub mod cost;
pub mod error;
pub mod fill;
pub mod flexgen;
pub mod model;
pub mod policy;
pub mod profile;
pub mod search;

pub use baselines::{gpu_only, layerwise, serial};
pub use cost::{
    DECODE_SMALL_KERNELS_S, PREFILL_ROWS, PhaseTime, Prediction, Stream, StreamTimes, TierBytes,
    gpu_kv_min_blocks, gpu_scratch_blocks, gpu_workspace_bytes, kv_slots_on, kv_tokens_on, memory,
    predict, prefill_batch_rows, prefill_workspace_bytes,
};
pub use error::{PlanError, ProfileError, Shortfall, human_bytes};
pub use flexgen::{FlexGenPlan, FlexGenPolicy, FlexGenSpace, PUBLISHED, PublishedPolicy};
pub use model::{Budgets, GEMV_MAX_ROWS, MlpKind, ModelSpec, Workload};
pub use policy::{
    Attention, HOST_MLP_MAX_ROWS, KvPlacement, POLICY_VERSION, PerTier, Policy, Tier, TierSplit,
    weight_layers,
};
pub use profile::{GemmTflops, HardwareProfile, PROFILE_VERSION};
pub use search::{Alternative, Plan, SearchSpace, plan, plan_with};
