//! A backend that keeps the set of online devices from Herald's presence notices.
//!
//! It subscribes to `$notice/<group>/#` (the topic template of the shipped `mqtt` sink),
//! applies each event once (by `seq`, so redeliveries are harmless) and prints every change.
//! No "wait five seconds and re-check": a device is online from its `connect` until the
//! `tcpclean` of the same channel, and Herald orders a takeover's `tcpclean` before the new
//! `connect`.
//!
//! Run it against the shipped config (which needs a key allowed to read `$notice/...`):
//!
//! ```sh
//! cargo run --example presence_backend -- 127.0.0.1 1883 backend backend-secret herald-demo GID_demo
//! ```

use std::collections::HashMap;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

/// What the backend knows of one client id.
#[derive(Debug, Default)]
struct Device {
    /// The open channel and since when, if online.
    channel: Option<(String, u64)>,
    /// The last seq applied.
    seq: u64,
}

/// Applies one event; returns a line to print when the online state changed.
fn apply(devices: &mut HashMap<String, Device>, event: &Value) -> Option<String> {
    let client = event["clientId"].as_str()?;
    let seq = event["seq"].as_u64()?;
    let channel = event["channelId"].as_str()?;
    let time = event["time"].as_u64()?;
    let device = devices.entry(client.to_string()).or_default();
    if seq <= device.seq {
        return None; // a redelivery: already applied
    }
    device.seq = seq;
    match event["eventType"].as_str()? {
        "connect" => {
            device.channel = Some((channel.to_string(), time));
            Some(format!("+ {client} online (channel {channel})"))
        }
        "tcpclean" if device.channel.as_ref().is_some_and(|(c, _)| c == channel) => {
            device.channel = None;
            let reason = event["reason"].as_str().unwrap_or("?");
            Some(format!("- {client} offline ({reason})"))
        }
        _ => None,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [host, port, key, secret, instance, group] = args.as_slice() else {
        eprintln!("usage: presence_backend HOST PORT ACCESS_KEY SECRET INSTANCE GROUP");
        std::process::exit(2);
    };
    let Ok(port) = port.parse::<u16>() else {
        eprintln!("PORT must be a number");
        std::process::exit(2);
    };
    let client_id = format!("{group}@@@presence-backend");
    let mut options = MqttOptions::new(client_id.clone(), host.clone(), port);
    options.set_keep_alive(Duration::from_secs(30));
    // A persistent session: notices published while this backend is away are queued for it.
    options.set_clean_session(false);
    options.set_credentials(
        format!("Signature|{key}|{instance}"),
        herald_auth::sign(secret, &client_id),
    );
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    if let Err(e) = client
        .subscribe(format!("$notice/{group}/#"), QoS::AtLeastOnce)
        .await
    {
        eprintln!("cannot subscribe: {e}");
        std::process::exit(1);
    }
    let mut devices = HashMap::new();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Ok(event) = serde_json::from_slice::<Value>(&p.payload) else {
                    continue;
                };
                if let Some(line) = apply(&mut devices, &event) {
                    let online = devices.values().filter(|d| d.channel.is_some()).count();
                    println!("{line}; {online} online");
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("connection error: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
