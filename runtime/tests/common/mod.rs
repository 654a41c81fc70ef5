//! What the `strata` CLI tests share: a scratch folder holding the CPU reference profile.

use std::path::PathBuf;

/// A fresh folder in the temp dir, unique to this process, `suite` and `tag`, with the CPU
/// reference profile as `profile.json` (nothing in these tests calibrates this machine); removed
/// when dropped.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn with_reference_profile(suite: &str, tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("strata-{suite}-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        strata_planner::HardwareProfile::cpu_only_reference()
            .save(&d.join("profile.json"))
            .unwrap();
        ScratchDir(d)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
