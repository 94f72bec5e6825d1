//! Signature-mode password check: HMAC-SHA1 of the client id, Base64, constant-time compare.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use herald_auth::{sign, verify_signature};

fn bench(c: &mut Criterion) {
    let client_id = "GID_demo@@@dev-1";
    let password = sign("demo-secret", client_id);
    assert_eq!(password, "5vPUiwwywQkBwF4swW30o85MOqw=");
    let mut group = c.benchmark_group("signature");
    group.bench_function("verify_ok", |b| {
        b.iter(|| verify_signature("demo-secret", black_box(client_id), password.as_bytes()))
    });
    group.bench_function("verify_wrong", |b| {
        b.iter(|| {
            verify_signature(
                "demo-secret",
                black_box(client_id),
                b"AAAAiwwywQkBwF4swW30o85MOqw=",
            )
        })
    });
    group.bench_function("sign", |b| {
        b.iter(|| sign("demo-secret", black_box(client_id)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
