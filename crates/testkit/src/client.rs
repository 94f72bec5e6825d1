//! `rumqttc` clients whose event loop runs in a task, with helpers to wait for what arrives.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnAck, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, Publish,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Options for `client_id` at `addr`: keepalive 30 s, clean session as given, packet size
/// limits raised past rumqttc's 10 KiB default.
pub fn options(addr: SocketAddr, client_id: &str, clean: bool) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean)
        .set_max_packet_size(1024 * 1024, 1024 * 1024);
    options
}

/// [`options`] with the demo key's Signature credentials.
pub fn signed_options(addr: SocketAddr, client_id: &str, clean: bool) -> MqttOptions {
    let mut options = options(addr, client_id, clean);
    options.set_credentials(crate::DEMO_USER, crate::signature(client_id));
    options
}

/// A connected client. Everything its event loop reports is kept in order.
pub struct TestClient {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    task: JoinHandle<()>,
    /// PUBLISHes that arrived while a helper waited for an acknowledgement.
    stash: std::collections::VecDeque<Publish>,
}

const WAIT: Duration = Duration::from_secs(10);

fn spawn_loop(
    mut eventloop: EventLoop,
) -> (
    mpsc::UnboundedReceiver<Result<Event, String>>,
    JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(event) => {
                    if tx.send(Ok(event)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    (rx, task)
}

impl TestClient {
    /// Connects and waits for the CONNACK; `Err` carries the refusal or connection error.
    pub async fn connect(options: MqttOptions) -> Result<(TestClient, ConnAck), String> {
        let (client, eventloop) = AsyncClient::new(options, 1000);
        let (mut events, task) = spawn_loop(eventloop);
        let connack = tokio::time::timeout(WAIT, async {
            while let Some(event) = events.recv().await {
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack),
                    Ok(_) => continue,
                    Err(e) => return Err(e),
                }
            }
            Err("event loop ended".to_string())
        })
        .await
        .map_err(|_| "no CONNACK within 10 s".to_string())??;
        if connack.code != ConnectReturnCode::Success {
            task.abort();
            return Err(format!("{:?}", connack.code));
        }
        Ok((
            TestClient {
                client,
                events,
                task,
                stash: Default::default(),
            },
            connack,
        ))
    }

    /// Connects, panicking on refusal.
    pub async fn connected(options: MqttOptions) -> TestClient {
        TestClient::connect(options).await.expect("connects").0
    }

    /// The next incoming packet other than PINGRESP, waiting up to `wait`.
    pub async fn next_incoming(&mut self, wait: Duration) -> Option<Result<Packet, String>> {
        tokio::time::timeout(wait, async {
            while let Some(event) = self.events.recv().await {
                match event {
                    Ok(Event::Incoming(Packet::PingResp)) => continue,
                    Ok(Event::Incoming(packet)) => return Some(Ok(packet)),
                    Ok(Event::Outgoing(_)) => continue,
                    Err(e) => return Some(Err(e)),
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    /// The next PUBLISH, skipping acknowledgements; panics after 10 s or on a connection error.
    pub async fn next_publish(&mut self) -> Publish {
        if let Some(publish) = self.stash.pop_front() {
            return publish;
        }
        loop {
            match self.next_incoming(WAIT).await {
                Some(Ok(Packet::Publish(publish))) => return publish,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("connection failed while waiting for a PUBLISH: {e}"),
                None => panic!("no PUBLISH within 10 s"),
            }
        }
    }

    /// Waits for the SUBACK of the last SUBSCRIBE and returns its codes.
    pub async fn suback(&mut self) -> Vec<rumqttc::SubscribeReasonCode> {
        loop {
            match self.next_incoming(WAIT).await {
                Some(Ok(Packet::SubAck(ack))) => return ack.return_codes,
                Some(Ok(Packet::Publish(p))) => self.stash.push_back(p),
                Some(Ok(_)) => continue,
                other => panic!("no SUBACK: {other:?}"),
            }
        }
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: rumqttc::QoS,
    ) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queue SUBSCRIBE");
        self.suback().await
    }

    /// Publishes and, for QoS 1, waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, qos: rumqttc::QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .expect("queue PUBLISH");
        let wanted = match qos {
            rumqttc::QoS::AtMostOnce => return,
            rumqttc::QoS::AtLeastOnce => "PubAck",
            rumqttc::QoS::ExactlyOnce => "PubComp",
        };
        loop {
            match self.next_incoming(WAIT).await {
                Some(Ok(Packet::PubAck(_))) if wanted == "PubAck" => return,
                Some(Ok(Packet::PubComp(_))) if wanted == "PubComp" => return,
                Some(Ok(Packet::Publish(p))) => self.stash.push_back(p),
                Some(Ok(_)) => continue,
                other => panic!("no {wanted}: {other:?}"),
            }
        }
    }

    /// Asserts no PUBLISH arrives within `wait`.
    pub async fn expect_no_publish(&mut self, wait: Duration) {
        if let Some(p) = self.stash.front() {
            panic!("unexpected PUBLISH on {}", p.topic);
        }
        let deadline = tokio::time::Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(tokio::time::Instant::now()) {
            match self.next_incoming(left).await {
                Some(Ok(Packet::Publish(p))) => panic!("unexpected PUBLISH on {}", p.topic),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            }
        }
    }

    /// Waits until the broker closes the connection; returns the error text.
    pub async fn closed(&mut self) -> String {
        loop {
            match self.next_incoming(WAIT).await {
                Some(Err(e)) => return e,
                Some(Ok(_)) => continue,
                None => panic!("connection still open after 10 s"),
            }
        }
    }

    /// Sends DISCONNECT and stops the event loop once it is written.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(event) = self.events.recv().await {
                if matches!(
                    event,
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)
                ) {
                    break;
                }
            }
        })
        .await;
        self.task.abort();
    }

    /// Drops the TCP connection without DISCONNECT.
    pub fn drop_connection(self) {
        self.task.abort();
    }
}
