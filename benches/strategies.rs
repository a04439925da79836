//! Criterion benches of the lab's strategies on three provider shapes: a lone root, a
//! property set, and a row set built on one thread and freed on another.
//!
//! `cargo bench --bench strategies`; `cargo bench --bench strategies -- propset` for one shape.
//! The shapes are the lab's own ([`shape`]), so these numbers and the lab's table agree.

use criterion::{criterion_group, criterion_main, Criterion};
use mapialloc::lab::rng::SplitMix64;
use mapialloc::lab::strategy::{
    Arena, Engine, KopanoGlibc, KopanoJemalloc, KopanoMimalloc, Strategy, Wine,
};
use mapialloc::lab::workload::shape::{self, SendRoot};
use std::sync::{mpsc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Registers `lone-root/<name>`, `propset/<name>` and `cross-thread-rowset/<name>` for `S`.
fn bench<S: Strategy>(name: &str, c: &mut Criterion) {
    let strategy = S::new();
    let s = &strategy;
    c.bench_function(&format!("lone-root/{name}"), |b| {
        b.iter(|| shape::free(s, shape::root(s, 64)))
    });

    let mut rng = SplitMix64::new(1);
    c.bench_function(&format!("propset/{name}"), |b| {
        b.iter(|| shape::free(s, shape::propset(s, &mut rng)))
    });

    c.bench_function(&format!("cross-thread-rowset/{name}"), |b| {
        b.iter_custom(|iters| cross_thread_rowset(s, iters))
    });
}

/// Thread A builds `iters` flat row sets and hands them to thread B, which frees them; both
/// start at a barrier, and the time runs until B has freed the last one.
fn cross_thread_rowset<S: Strategy>(s: &S, iters: u64) -> Duration {
    let barrier = Barrier::new(2);
    let (tx, rx) = mpsc::sync_channel::<SendRoot>(2);
    let start = thread::scope(|scope| {
        let barrier = &barrier;
        scope.spawn(move || {
            barrier.wait();
            for SendRoot(root) in rx {
                shape::free(s, root);
            }
        });
        let mut rng = SplitMix64::new(4);
        barrier.wait();
        let start = Instant::now();
        for _ in 0..iters {
            tx.send(SendRoot(shape::flat_rowset(s, &mut rng)))
                .expect("B frees until the channel closes");
        }
        drop(tx);
        start
    });
    start.elapsed()
}

fn strategies(c: &mut Criterion) {
    bench::<Engine>("engine", c);
    bench::<Wine>("wine", c);
    bench::<KopanoGlibc>("kopano-glibc", c);
    bench::<KopanoMimalloc>("kopano-mimalloc", c);
    bench::<KopanoJemalloc>("kopano-jemalloc", c);
    bench::<Arena>("arena", c);
    #[cfg(feature = "talloc")]
    bench::<mapialloc::lab::strategy::Talloc>("talloc", c);
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = strategies
}
criterion_main!(benches);
