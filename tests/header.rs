//! `include/mapialloc.h` is what cbindgen makes of `src/capi.rs` today, and it compiles
//! cleanly as C99 and as C++.
//!
//! When the header is stale: `MAPIALLOC_BLESS=1 cargo test --test header` rewrites it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The checked-in header, relative to the package root.
const HEADER: &str = "include/mapialloc.h";

fn package_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory for this test binary, under `target/tmp`.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("header")
        .join(name);
    fs::create_dir_all(&dir).expect("create scratch directory");
    dir
}

/// Generates the header from `src/capi.rs` with `cbindgen.toml`.
fn generate() -> String {
    let root = package_root();
    let source = fs::read_to_string(root.join("src/capi.rs")).expect("read src/capi.rs");
    // cbindgen exports only `extern "C"` functions. `extern "system"` is the C convention on
    // every target the header supports (it refuses 32-bit Windows), so read it as "C".
    let source = source.replace("extern \"system\"", "extern \"C\"");
    let input = scratch("cbindgen").join("capi.rs");
    fs::write(&input, source).expect("write cbindgen input");

    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(&input)
        .generate()
        .expect("cbindgen generates the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

#[test]
fn checked_in_header_is_current() {
    let generated = generate();
    let path = package_root().join(HEADER);
    if std::env::var_os("MAPIALLOC_BLESS").is_some() {
        // Write beside and rename, so the compile tests never read a half-written header.
        let partial = path.with_extension("h.partial");
        fs::write(&partial, &generated).expect("write the header");
        fs::rename(&partial, &path).expect("replace the header");
        return;
    }
    let checked_in = fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let fresh = scratch("cbindgen").join("mapialloc.h");
        fs::write(&fresh, &generated).expect("write the generated header");
        panic!(
            "{HEADER} is stale (the generated one is at {}).\n\
             Regenerate it with: MAPIALLOC_BLESS=1 cargo test --test header",
            fresh.display()
        );
    }
}

/// A translation unit that includes the header and uses every declaration, so unused or
/// mismatched declarations show up as warnings (errors under -Werror).
const USE_EVERY_DECLARATION: &str = r#"
#include "mapialloc.h"

int main(void) {
    /* The exports have the shapes of MAPI's typedefs. */
    LPALLOCATEBUFFER allocate_buffer = MAPIAllocateBuffer;
    LPALLOCATEMORE allocate_more = MAPIAllocateMore;
    LPFREEBUFFER free_buffer = MAPIFreeBuffer;
    struct mapialloc_stats stats;
    SCODE codes[3] = { S_OK, MAPI_E_NOT_ENOUGH_MEMORY, MAPI_E_INVALID_PARAMETER };
    ULONG size = 0;
    LPVOID root = 0;
    SCODE sc = mapialloc_mem_alloc_routines(&allocate_buffer, &allocate_more, &free_buffer);
    sc |= allocate_buffer(size, &root);
    sc |= mapialloc_stats(&stats);
    mapialloc_collect();
    mapialloc_release_thread_cache();
    (void)allocate_more;
    return (int)(free_buffer(root) + (ULONG)(sc != codes[0]) + (ULONG)(codes[1] == codes[2]) +
                 (ULONG)stats.live_roots);
}
"#;

/// Compiles the translation unit with `compiler` and `flags`, syntax only; `None` when the
/// compiler is not installed.
fn compile(compiler: &str, language: &str, flags: &[&str]) -> Option<std::process::Output> {
    let dir = scratch("compile");
    let extension = if language == "c" { "c" } else { "cpp" };
    let tu = dir.join(format!("use_header.{extension}"));
    fs::write(&tu, USE_EVERY_DECLARATION).expect("write the translation unit");
    let include = package_root().join("include");
    let result = Command::new(compiler)
        .args(flags)
        .arg("-fsyntax-only")
        .arg("-I")
        .arg(&include)
        .arg(&tu)
        .output();
    match result {
        Ok(output) => Some(output),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: `{compiler}` is not installed; the header was not compiled");
            None
        }
        Err(e) => panic!("running {compiler}: {e}"),
    }
}

fn assert_compiles(compiler: &str, language: &str, flags: &[&str]) {
    if let Some(output) = compile(compiler, language, flags) {
        assert!(
            output.status.success(),
            "{compiler} {} rejects {HEADER}:\n{}",
            flags.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn header_compiles_as_c99() {
    assert_compiles(
        "cc",
        "c",
        &["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"],
    );
}

#[test]
fn header_compiles_as_cxx() {
    assert_compiles(
        "c++",
        "c++",
        &["-x", "c++", "-Wall", "-Wextra", "-Werror", "-pedantic"],
    );
}
