//! Build script: links the system talloc for the lab's `talloc` strategy (feature `talloc`),
//! and records the compiler version for the lab's report.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_TALLOC").is_some() {
        // From libtalloc-dev (Debian/Ubuntu: `sudo apt-get install libtalloc-dev`).
        println!("cargo:rustc-link-lib=talloc");
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    if let Ok(output) = Command::new(rustc).arg("--version").output() {
        let version = String::from_utf8_lossy(&output.stdout);
        println!("cargo:rustc-env=MAPIALLOC_RUSTC_VERSION={}", version.trim());
    }
}
