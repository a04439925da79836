//! What the lab ran on, for the report: numbers from different machines do not compare.

use serde::Serialize;

/// The machine and the build that produced a report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Machine {
    /// CPU model name (`/proc/cpuinfo`), "unknown" elsewhere.
    pub cpu: String,
    /// CPUs this process may run on.
    pub cores: usize,
    /// Kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: String,
    /// Operating system and architecture, e.g. `linux-x86_64`.
    pub os: String,
    /// The compiler that built the lab (`rustc --version` at build time).
    pub rustc: String,
    /// The lab's (the crate's) version.
    pub lab_version: String,
}

impl Machine {
    /// Describes this machine.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine {
            cpu: cpu_model(&cpuinfo).unwrap_or("unknown").to_owned(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
                |_| "unknown".to_owned(),
                |release| release.trim().to_owned(),
            ),
            os: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
            rustc: option_env!("MAPIALLOC_RUSTC_VERSION")
                .unwrap_or("unknown")
                .to_owned(),
            lab_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// The first `model name` of a `/proc/cpuinfo` text.
fn cpu_model(cpuinfo: &str) -> Option<&str> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_model_name() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
        assert_eq!(cpu_model(cpuinfo), Some("Intel(R) Xeon(R) CPU @ 2.20GHz"));
        assert_eq!(cpu_model("processor : 0\n"), None);
    }

    #[test]
    fn detects_at_least_one_core() {
        assert!(Machine::detect().cores >= 1);
    }
}
