//! The C library, from C: SPEC.md's table and the threaded cases (`tests/c/mapi_test.c`)
//! against the shared and the static library, `LD_PRELOAD` interposition over another MAPI
//! library (`tests/c/fake_mapi.c`, `tests/c/interpose.c`), the provider example, and the
//! `MAPIALLOC_LEAKS` report and `MAPIALLOC_TRACE` recording of a leaking program
//! (`tests/c/leaks.c`).
//!
//! `cargo test` builds the library's cdylib and staticlib next to this test's executable
//! (`target/<profile>/deps`); the C sources are compiled there with the system `cc`, into
//! `target/tmp/c_abi`. Every test is skipped, with a message, when `cc` is not installed.
//!
//! Environment:
//! - `MAPIALLOC_C_RUNNER`: a command that prefixes each run of `mapi_test`, e.g.
//!   `valgrind --error-exitcode=1 --leak-check=full` (`.ci/c-valgrind.sh` sets it).
//! - `MAPIALLOC_C_THREADS`: the number of short-lived threads in `mapi_test` (default 2000).

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Native libraries a C program links with `libmapialloc.a` on Linux
/// (`cargo rustc --lib -- --print native-static-libs`).
const NATIVE_STATIC_LIBS: &[&str] = &[
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// Warnings are errors in every C build.
const C_FLAGS: &[&str] = &[
    "-std=c11",
    "-g",
    "-O1",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pedantic",
];

fn package_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where cargo put `libmapialloc.so` and `libmapialloc.a` for this build: beside the test
/// executable (`target/<profile>/deps`), or one level up after a plain `cargo build`.
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the test executable's directory");
    let found = [deps, deps.parent().unwrap_or(deps)]
        .into_iter()
        .find(|dir| dir.join("libmapialloc.so").exists())
        .map(Path::to_path_buf);
    found.unwrap_or_else(|| {
        panic!(
            "libmapialloc.so is neither in {} nor its parent: is cdylib gone from crate-type?",
            deps.display()
        )
    })
}

/// A scratch directory for one test's C artifacts.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("c_abi")
        .join(test);
    fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

/// True when the system C compiler runs; prints why the test is skipped otherwise.
fn have_cc(test: &str) -> bool {
    match Command::new("cc").arg("--version").output() {
        Ok(out) if out.status.success() => true,
        _ => {
            eprintln!("SKIPPED {test}: no working `cc` on PATH, the C tests need one");
            false
        }
    }
}

/// Runs `cmd`, echoes its output (shown by `cargo test -- --nocapture` or on failure) and
/// returns it.
fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    print!("{}", String::from_utf8_lossy(&output.stdout));
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    output
}

/// A command that runs a C program built here. `cargo test` puts `target/<profile>` before
/// `target/<profile>/deps` in `LD_LIBRARY_PATH`, which outranks the programs' rpath: a stale
/// `libmapialloc.so` left there by `cargo build` would be loaded instead of the one this test
/// build made. Without the variable, the rpath names the library.
fn c_program(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd
}

/// Compiles and links with `cc`, panicking with the compiler's messages on failure.
fn cc<I, S>(args: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("cc");
    cmd.args(args);
    let output = run(&mut cmd);
    assert!(output.status.success(), "the C build failed: {cmd:?}");
}

/// `-I` for the checked-in header.
fn include_flag() -> String {
    format!("-I{}", package_root().join("include").display())
}

/// Flags that link the shared library, found at run time through an rpath.
fn shared_link_flags(lib_dir: &Path) -> Vec<String> {
    vec![
        format!("-L{}", lib_dir.display()),
        "-lmapialloc".to_owned(),
        format!("-Wl,-rpath,{}", lib_dir.display()),
        "-pthread".to_owned(),
    ]
}

/// Flags that link the static library and what it needs from the system.
fn static_link_flags(lib_dir: &Path) -> Vec<String> {
    let mut flags = vec![
        lib_dir.join("libmapialloc.a").display().to_string(),
        "-pthread".to_owned(),
    ];
    flags.extend(NATIVE_STATIC_LIBS.iter().map(|s| s.to_string()));
    flags
}

/// Builds `tests/c/mapi_test.c` into `dir` with the given link flags.
fn build_mapi_test(dir: &Path, link: &[String]) -> PathBuf {
    let exe = dir.join("mapi_test");
    let source = package_root().join("tests/c/mapi_test.c");
    let mut args: Vec<String> = C_FLAGS.iter().map(|s| s.to_string()).collect();
    args.push(include_flag());
    args.push(source.display().to_string());
    args.push("-o".to_owned());
    args.push(exe.display().to_string());
    args.extend(link.iter().cloned());
    cc(&args);
    exe
}

/// Runs `mapi_test`, through `MAPIALLOC_C_RUNNER` when set, and asserts it passed.
fn run_mapi_test(exe: &Path) {
    let runner = std::env::var("MAPIALLOC_C_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut cmd = c_program(program);
            cmd.args(words).arg(exe);
            cmd
        }
        None => c_program(exe),
    };
    if let Ok(threads) = std::env::var("MAPIALLOC_C_THREADS") {
        cmd.args(["--threads", &threads]);
    }
    let output = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "mapi_test failed ({}): see its output above",
        output.status
    );
    assert!(
        stdout.contains(" 0 failed"),
        "mapi_test did not report its summary"
    );
    assert!(!stdout.contains("FAIL"), "a mapi_test case failed");
}

#[test]
fn spec_rows_and_threads_from_c_shared_library() {
    if !have_cc("spec_rows_and_threads_from_c_shared_library") {
        return;
    }
    let dir = scratch("shared");
    let exe = build_mapi_test(&dir, &shared_link_flags(&library_dir()));
    run_mapi_test(&exe);
}

#[test]
fn spec_rows_and_threads_from_c_static_library() {
    if !have_cc("spec_rows_and_threads_from_c_static_library") {
        return;
    }
    let dir = scratch("static");
    let exe = build_mapi_test(&dir, &static_link_flags(&library_dir()));
    run_mapi_test(&exe);
}

#[test]
fn ld_preload_interposes_the_mapi_exports() {
    if !have_cc("ld_preload_interposes_the_mapi_exports") {
        return;
    }
    let dir = scratch("interpose");
    let c = package_root().join("tests/c");
    let fake = dir.join("libfake_mapi.so");
    let mut args: Vec<String> = C_FLAGS.iter().map(|s| s.to_string()).collect();
    args.extend([
        include_flag(),
        "-shared".to_owned(),
        "-fPIC".to_owned(),
        c.join("fake_mapi.c").display().to_string(),
        "-o".to_owned(),
        fake.display().to_string(),
    ]);
    cc(&args);

    let exe = dir.join("interpose");
    let mut args: Vec<String> = C_FLAGS.iter().map(|s| s.to_string()).collect();
    args.extend([
        include_flag(),
        c.join("interpose.c").display().to_string(),
        "-o".to_owned(),
        exe.display().to_string(),
        format!("-L{}", dir.display()),
        "-lfake_mapi".to_owned(),
        format!("-Wl,-rpath,{}", dir.display()),
        "-ldl".to_owned(),
    ]);
    cc(&args);

    // Without the preload, the library the program was linked against serves the calls:
    // this shows the check below can tell the two apart.
    let alone = run(c_program(&exe).env_remove("LD_PRELOAD"));
    assert!(
        alone.status.success(),
        "interpose without LD_PRELOAD: {}",
        alone.status
    );
    assert!(String::from_utf8_lossy(&alone.stdout).contains("served-by=fake"));

    let so = library_dir().join("libmapialloc.so");
    let preloaded = run(c_program(&exe).env("LD_PRELOAD", &so));
    assert!(
        preloaded.status.success(),
        "interpose with LD_PRELOAD: {}",
        preloaded.status
    );
    assert!(
        String::from_utf8_lossy(&preloaded.stdout).contains("served-by=mapialloc"),
        "with LD_PRELOAD={} the MAPI calls must be served by mapialloc",
        so.display()
    );
}

#[test]
fn provider_example_runs() {
    if !have_cc("provider_example_runs") {
        return;
    }
    let dir = scratch("provider");
    let exe = dir.join("provider");
    let mut args: Vec<String> = ["-std=c99", "-g", "-Wall", "-Wextra", "-Werror", "-pedantic"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend([
        include_flag(),
        package_root()
            .join("examples/c/provider.c")
            .display()
            .to_string(),
        "-o".to_owned(),
        exe.display().to_string(),
    ]);
    args.extend(shared_link_flags(&library_dir()));
    cc(&args);
    let output = run(&mut c_program(&exe));
    assert!(
        output.status.success(),
        "the provider example failed: {}",
        output.status
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("live roots: 0, live blocks: 0"));
}

/// `tests/c/leaks.c` under `MAPIALLOC_LEAKS=1` and `MAPIALLOC_TRACE`: the exit report names
/// its three live roots, and the trace holds its 20 calls on two threads.
#[test]
fn leak_report_and_trace_of_a_c_program() {
    use mapialloc::trace::{self, Call, Status};
    if !have_cc("leak_report_and_trace_of_a_c_program") {
        return;
    }
    let dir = scratch("leaks");
    let exe = dir.join("leaks");
    let mut args: Vec<String> = C_FLAGS.iter().map(|s| s.to_string()).collect();
    args.extend([
        include_flag(),
        package_root().join("tests/c/leaks.c").display().to_string(),
        "-o".to_owned(),
        exe.display().to_string(),
    ]);
    args.extend(shared_link_flags(&library_dir()));
    cc(&args);

    // `%p` becomes the process id: the one trace the run leaves is that process's.
    let traces = || -> Vec<PathBuf> {
        fs::read_dir(&dir)
            .expect("the scratch directory")
            .map(|entry| entry.expect("a directory entry").path())
            .filter(|path| path.extension() == Some(OsStr::new("mtrace")))
            .collect()
    };
    traces()
        .iter()
        .for_each(|old| fs::remove_file(old).expect("remove an old trace"));
    let child = c_program(&exe)
        .env("MAPIALLOC_LEAKS", "1")
        .env("MAPIALLOC_TRACE", dir.join("leaks-%p.mtrace"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run leaks");
    let pid = child.id();
    let output = child.wait_with_output().expect("leaks ran");
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    let trace_path = dir.join(format!("leaks-{pid}.mtrace"));
    assert_eq!(traces(), std::slice::from_ref(&trace_path));
    assert!(output.status.success(), "leaks.c failed: {}", output.status);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let summary = lines
        .iter()
        .position(|l| l.starts_with("mapialloc: ") && l.ends_with(" at exit"))
        .unwrap_or_else(|| panic!("no leak line on stderr: {stderr}"));
    let head = "mapialloc: 3 live roots (8 blocks, ";
    assert!(
        lines[summary].starts_with(head) && lines[summary].ends_with(" bytes) at exit"),
        "{}",
        lines[summary]
    );
    let details = &lines[summary + 1..];
    assert_eq!(details.len(), 3, "one line a live root: {stderr}");
    assert!(
        details[0].contains("3 linked blocks"),
        "largest first: {}",
        details[0]
    );
    assert!(details.iter().all(|l| l.contains("page of ")));

    let records = trace::read(&trace_path).expect("a readable trace");
    assert_eq!(records.len(), 20);
    let count = |call, status| {
        records
            .iter()
            .filter(|r| r.call == call && r.status == status)
            .count()
    };
    assert_eq!(count(Call::AllocateBuffer, Status::Ok), 8);
    assert_eq!(count(Call::AllocateMore, Status::Ok), 5);
    assert_eq!(count(Call::FreeBuffer, Status::Ok), 5);
    assert_eq!(count(Call::FreeBuffer, Status::DoubleFree), 1);
    assert_eq!(count(Call::FreeBuffer, Status::FreedNull), 1);
    let mut threads: Vec<u32> = records.iter().map(|r| r.thread).collect();
    threads.sort_unstable();
    threads.dedup();
    assert_eq!(threads, [1, 2]);

    // Without the variables, nothing is reported.
    let quiet = run(&mut c_program(&exe));
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("live roots"));
}
