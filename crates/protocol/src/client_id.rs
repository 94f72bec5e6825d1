//! Client ids: `<GroupID>@@@<DeviceID>` as Alibaba's MQTT service defines them, parsed once.

use std::fmt;
use std::sync::Arc;

/// The separator between the group and the device.
pub const SEPARATOR: &str = "@@@";

/// Why a client id is refused (CONNACK 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientIdError {
    #[error("empty client id")]
    Empty,
    #[error("client id is {len} chars, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("client id is not of the form GroupID@@@DeviceID")]
    NoSeparator,
    #[error("group id must be 7-64 chars of [A-Za-z0-9_-]")]
    BadGroup,
    #[error("device id must be 1+ chars of [A-Za-z0-9_-]")]
    BadDevice,
}

/// A client id, with its group and device halves when it has the Alibaba form.
/// Cheap to clone. Compares, orders and hashes as its text, so maps keyed by it can be
/// looked up with a `&str`.
#[derive(Clone)]
pub struct ClientId {
    /// The id behind one character that gives the byte offset of the separator when the id is
    /// `Group@@@Device`, else `'\0'`. A Group ID is 7 to 64 characters, so the offset is one
    /// ASCII character and never 0. Kept in the id's allocation, so that this struct, of which
    /// every map keyed by client id holds a copy, is 16 bytes (24 with the offset beside the
    /// `Arc`, which puts a map of known clients' nodes in the allocator's next size class).
    id: Arc<str>,
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Whether `group` is a well-formed Group ID: 7-64 chars of `[A-Za-z0-9_-]`.
pub fn is_valid_group_id(group: &str) -> bool {
    (7..=64).contains(&group.len()) && group.chars().all(is_id_char)
}

impl ClientId {
    /// Parses a client id of the form `GroupID@@@DeviceID`, at most `max_len` chars.
    pub fn parse_alibaba(id: &str, max_len: usize) -> Result<ClientId, ClientIdError> {
        check_len(id, max_len)?;
        let split = id.find(SEPARATOR).ok_or(ClientIdError::NoSeparator)?;
        let (group, device) = (&id[..split], &id[split + SEPARATOR.len()..]);
        if !is_valid_group_id(group) {
            return Err(ClientIdError::BadGroup);
        }
        if device.is_empty() || !device.chars().all(is_id_char) {
            return Err(ClientIdError::BadDevice);
        }
        // A Group ID is at most 64 chars: the offset is ASCII.
        let Some(split) = u8::try_from(split).ok().filter(u8::is_ascii) else {
            return Err(ClientIdError::BadGroup);
        };
        Ok(ClientId::with_split(id, split))
    }

    fn with_split(id: &str, split: u8) -> ClientId {
        let mut text = String::with_capacity(1 + id.len());
        text.push(char::from(split));
        text.push_str(id);
        ClientId { id: text.into() }
    }

    /// Accepts any non-empty id of at most `max_len` chars (plain MQTT clients). The group and
    /// device halves are still recognised when the id happens to have the Alibaba form.
    pub fn parse_any(id: &str, max_len: usize) -> Result<ClientId, ClientIdError> {
        check_len(id, max_len)?;
        if let Ok(parsed) = ClientId::parse_alibaba(id, max_len) {
            return Ok(parsed);
        }
        Ok(ClientId::with_split(id, 0))
    }

    pub fn as_str(&self) -> &str {
        // The first character is ASCII (the offset): byte 1 starts a character.
        self.id.get(1..).unwrap_or_default()
    }

    /// The Group ID, when the id has the `Group@@@Device` form.
    pub fn group(&self) -> Option<&str> {
        self.as_str().get(..self.split()?)
    }

    /// The Device ID, when the id has the `Group@@@Device` form.
    pub fn device(&self) -> Option<&str> {
        self.as_str().get(self.split()? + SEPARATOR.len()..)
    }

    fn split(&self) -> Option<usize> {
        let split = *self.id.as_bytes().first()?;
        (split > 0).then_some(usize::from(split))
    }
}

fn check_len(id: &str, max_len: usize) -> Result<(), ClientIdError> {
    if id.is_empty() {
        return Err(ClientIdError::Empty);
    }
    let len = id.chars().count();
    if len > max_len {
        return Err(ClientIdError::TooLong { len, max: max_len });
    }
    Ok(())
}

impl PartialEq for ClientId {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for ClientId {}

impl std::hash::Hash for ClientId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialOrd for ClientId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ClientId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::borrow::Borrow<str> for ClientId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibaba_ids_split_into_group_and_device() {
        let id = ClientId::parse_alibaba("GID_demo@@@dev-1", 64).expect("valid");
        assert_eq!(id.group(), Some("GID_demo"));
        assert_eq!(id.device(), Some("dev-1"));
        assert_eq!(id.as_str(), "GID_demo@@@dev-1");
    }

    #[test]
    fn a_client_id_is_small_and_keeps_the_longest_group() {
        assert_eq!(std::mem::size_of::<ClientId>(), 16);
        let group = format!("GID_{}", "g".repeat(60));
        let id = ClientId::parse_alibaba(&format!("{group}@@@d"), 100).expect("valid");
        assert_eq!(id.group(), Some(group.as_str()));
        assert_eq!(id.device(), Some("d"));
        let plain = ClientId::parse_any("sensor-7", 64).expect("valid");
        assert_eq!((plain.group(), plain.device()), (None, None));
    }

    #[test]
    fn malformed_ids_are_refused() {
        use ClientIdError::*;
        let cases = [
            ("", Empty),
            ("GID_demo", NoSeparator),
            ("GID@@@dev", BadGroup),
            ("GID demo@@@dev", BadGroup),
            ("GID_demo@@@", BadDevice),
            ("GID_demo@@@a/b", BadDevice),
        ];
        for (id, err) in cases {
            assert_eq!(ClientId::parse_alibaba(id, 64), Err(err), "{id}");
        }
        let long = format!("GID_demo@@@{}", "x".repeat(60));
        assert!(matches!(
            ClientId::parse_alibaba(&long, 64),
            Err(TooLong { .. })
        ));
    }

    #[test]
    fn any_format_takes_plain_ids() {
        let id = ClientId::parse_any("sensor 7", 64).expect("valid");
        assert_eq!(id.group(), None);
        let id = ClientId::parse_any("GID_demo@@@d", 64).expect("valid");
        assert_eq!(id.group(), Some("GID_demo"));
        assert_eq!(ClientId::parse_any("", 64), Err(ClientIdError::Empty));
    }
}
