//! Decode and encode of a QoS 1 PUBLISH with a 64-byte payload through `herald_protocol::Codec`.

use std::hint::black_box;
use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use herald_protocol::{Codec, Packet, Publish, QoS, Topic};
use tokio_util::codec::{Decoder, Encoder};

fn publish() -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Topic::new("demo/dev-1/telemetry/temp", 128).expect("valid topic"),
        packet_id: NonZeroU16::new(42),
        payload: Bytes::from(vec![b'x'; 64]),
    })
}

fn bench(c: &mut Criterion) {
    let packet = publish();
    let mut frame = BytesMut::new();
    Codec::new(65536)
        .encode(&packet, &mut frame)
        .expect("encodes");
    let frame = frame.freeze();

    let mut group = c.benchmark_group("publish_64b_qos1");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode", |b| {
        let mut codec = Codec::new(65536);
        let mut buf = BytesMut::with_capacity(256);
        b.iter(|| {
            buf.clear();
            codec
                .encode(black_box(packet.clone()), &mut buf)
                .expect("encodes");
            black_box(buf.len())
        })
    });
    group.bench_function("decode", |b| {
        let mut codec = Codec::new(65536);
        b.iter_batched(
            || BytesMut::from(&frame[..]),
            |mut buf| black_box(codec.decode(&mut buf).expect("decodes")),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("decode_100_in_one_buffer", |b| {
        let mut codec = Codec::new(65536);
        let many: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * 100)
            .collect();
        b.iter_batched(
            || BytesMut::from(&many[..]),
            |mut buf| {
                let mut n = 0;
                while let Some(p) = codec.decode(&mut buf).expect("decodes") {
                    black_box(p);
                    n += 1;
                }
                n
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
