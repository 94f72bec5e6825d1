//! Topic match against 100,000 filters in the router's subscription tree.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use herald_protocol::{ClientId, QoS};
use herald_router::tree::SubscriptionTree;

const FILTERS: usize = 100_000;

/// 100k filters shaped like a device fleet: per-device exact topics, per-device `+` filters,
/// per-group `#` filters, and a few broad wildcards.
fn fleet() -> SubscriptionTree {
    let mut tree = SubscriptionTree::default();
    for i in 0..FILTERS {
        let client = ClientId::parse_any(&format!("GID_demo@@@dev-{i}"), 64).expect("valid id");
        let filter = match i % 4 {
            0 => format!("demo/dev-{i}/status"),
            1 => format!("demo/dev-{}/+/temp", i - 1),
            2 => format!("demo/group-{}/#", i % 1000),
            _ => format!("demo/+/cmd-{}", i % 5000),
        };
        tree.insert(&filter, &client, QoS::AtLeastOnce);
    }
    let backend = ClientId::parse_any("GID_demo@@@backend", 64).expect("valid id");
    tree.insert("demo/#", &backend, QoS::AtMostOnce);
    tree
}

fn bench(c: &mut Criterion) {
    let tree = fleet();
    let mut group = c.benchmark_group("topic_match_100k_filters");
    for topic in [
        "demo/dev-4000/status",
        "demo/dev-4000/room/temp",
        "demo/group-7/a/b/c",
        "demo/nobody/cmd-3",
        "other/x/y",
    ] {
        let mut out = HashMap::new();
        group.bench_function(topic, |b| {
            b.iter(|| {
                out.clear();
                tree.matches(black_box(topic), &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
