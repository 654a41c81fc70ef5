//! strata's planner: model spec + workload + hardware profile -> a frozen `Policy` and a predicted
//! time breakdown. Pure (no CUDA, no IO). Empty until the planner issue lands; the crate exists so
//! the workspace has the layout DESIGN.md gives from the start.
