//! Envelope throughput on a real 16 MiB WAL segment: encode and decode at
//! zstd levels 1 and 3, with and without encryption, plus uncompressed.
//!
//! The segment comes from `WALSAFE_BENCH_SEGMENT` or
//! `target/bench-wal-segment`; make one with `scripts/make-bench-segment.sh`.
//!
//! Run: `cargo bench --bench envelope -- --warm-up-time 1 --measurement-time 3`

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use walsafe::repository::envelope::{decode, encode};
use walsafe::repository::key::Key;
use walsafe::repository::Compression;

const NAME: &str = "00000001000000000000001D";

fn segment() -> Vec<u8> {
    let path = std::env::var_os("WALSAFE_BENCH_SEGMENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-wal-segment")
        });
    match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => panic!(
            "cannot read the bench WAL segment {} ({e}); run scripts/make-bench-segment.sh \
             (or set WALSAFE_BENCH_SEGMENT to a 16 MiB WAL segment)",
            path.display()
        ),
    }
}

fn bench(c: &mut Criterion) {
    let seg = segment();
    let key = Key::generate();
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Bytes(seg.len() as u64));
    g.sample_size(10);
    let cases: [(&str, Compression, i32, bool); 6] = [
        ("zstd1", Compression::Zstd, 1, false),
        ("zstd1+aes", Compression::Zstd, 1, true),
        ("zstd3", Compression::Zstd, 3, false),
        ("zstd3+aes", Compression::Zstd, 3, true),
        ("none", Compression::None, 0, false),
        ("none+aes", Compression::None, 0, true),
    ];
    for (label, comp, level, encrypt) in cases {
        let k = encrypt.then_some(&key);
        let obj = encode(NAME, &seg, comp, level, k);
        eprintln!(
            "{label}: {} -> {} bytes ({:.1}x)",
            seg.len(),
            obj.len(),
            seg.len() as f64 / obj.len() as f64
        );
        g.bench_function(BenchmarkId::new("encode", label), |b| {
            b.iter(|| encode(NAME, &seg, comp, level, k))
        });
        g.bench_function(BenchmarkId::new("decode", label), |b| {
            b.iter(|| decode(NAME, &obj, k).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
