//! Topic names and topic filters (MQTT 3.1.1 section 4.7): validation and matching.
//!
//! A [`Topic`] is a validated topic name that shares its bytes with the frame it came in.
//! Filters are plain `&str` checked by [`validate_filter`]; [`matches`] and [`covers`] are the
//! two questions the broker asks of them.

use std::fmt;

use bytestring::ByteString;

/// Why a topic name or filter is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("empty topic")]
    Empty,
    #[error("topic is {len} bytes, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("wildcard in a topic name")]
    Wildcard,
    #[error("NUL character in a topic")]
    Nul,
    #[error("'#' must be the last level and stand alone")]
    BadMultiLevelWildcard,
    #[error("'+' must occupy a whole level")]
    BadSingleLevelWildcard,
}

/// A topic name: non-empty, no wildcards, no NUL. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(ByteString);

impl Topic {
    /// Validates a topic name of at most `max_len` bytes.
    pub fn new(name: impl Into<ByteString>, max_len: usize) -> Result<Topic, TopicError> {
        let name: ByteString = name.into();
        validate_name(&name, max_len)?;
        Ok(Topic(name))
    }

    /// Wraps a topic that the caller has already validated (the broker's own topics).
    pub fn from_trusted(name: impl Into<ByteString>) -> Topic {
        Topic(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn into_inner(self) -> ByteString {
        self.0
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Checks a topic name: non-empty, at most `max_len` bytes, no `+`, `#` or NUL.
pub fn validate_name(name: &str, max_len: usize) -> Result<(), TopicError> {
    check_common(name, max_len)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    Ok(())
}

/// Checks a topic filter: non-empty, at most `max_len` bytes, no NUL, `+` alone in its
/// level, `#` alone in the last level.
pub fn validate_filter(filter: &str, max_len: usize) -> Result<(), TopicError> {
    check_common(filter, max_len)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::BadMultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::BadSingleLevelWildcard);
        }
    }
    Ok(())
}

fn check_common(s: &str, max_len: usize) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > max_len {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: max_len,
        });
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Whether a (valid) filter matches a topic name. A leading wildcard does not match a topic
/// that starts with `$` (MQTT-4.7.2-1).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for filter_level in filter.split('/') {
        if filter_level == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(level) if filter_level == "+" || filter_level == level => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Whether every topic that `inner` matches is also matched by `outer`. Used to decide if a
/// permission filter allows a subscription filter.
pub fn covers(outer: &str, inner: &str) -> bool {
    let inner_is_dollar = inner.starts_with('$');
    let outer_leading_wild = outer.starts_with('+') || outer.starts_with('#');
    let inner_leading_wild = inner.starts_with('+') || inner.starts_with('#');
    // A leading wildcard in `outer` never reaches `$` topics; a leading wildcard in `inner`
    // reaches non-`$` topics only, so `$`-literal outer filters cannot cover it.
    if inner_is_dollar && outer_leading_wild {
        return false;
    }
    if inner_leading_wild && outer.starts_with('$') {
        return false;
    }
    let mut inner_levels = inner.split('/');
    for outer_level in outer.split('/') {
        if outer_level == "#" {
            return true;
        }
        match inner_levels.next() {
            Some("#") => return false,
            Some("+") if outer_level == "+" => {}
            Some("+") => return false,
            Some(level) if outer_level == "+" || outer_level == level => {}
            _ => return false,
        }
    }
    inner_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters_are_validated() {
        assert!(validate_name("a/b", 10).is_ok());
        assert_eq!(validate_name("", 10), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+", 10), Err(TopicError::Wildcard));
        assert_eq!(validate_name("a/#", 10), Err(TopicError::Wildcard));
        assert_eq!(validate_name("a\0b", 10), Err(TopicError::Nul));
        assert!(matches!(
            validate_name("abcdef", 3),
            Err(TopicError::TooLong { len: 6, max: 3 })
        ));
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "/", "a//b", "$SYS/#"] {
            assert!(validate_filter(ok, 64).is_ok(), "{ok}");
        }
        for bad in ["a#", "a/#/b", "a/b+", "+a", "#/a", ""] {
            assert!(validate_filter(bad, 64).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_follows_the_spec_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "a/b/c"));
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn covering_is_a_subset_relation() {
        assert!(covers("demo/#", "demo/a/+"));
        assert!(covers("demo/#", "demo"));
        assert!(covers("demo/#", "demo/#"));
        assert!(covers("demo/+", "demo/x"));
        assert!(covers("demo/+", "demo/+"));
        assert!(!covers("demo/+", "demo/#"));
        assert!(!covers("demo/x", "demo/+"));
        assert!(!covers("demo/#", "other/x"));
        assert!(covers("#", "a/b"));
        assert!(!covers("#", "$notice/x"));
        assert!(covers("$notice/#", "$notice/GID/+"));
        assert!(!covers("$notice/#", "#"));
        assert!(!covers("a/b", "a/b/c"));
    }
}

/// The target client id of a P2P topic `<parent>/p2p/<clientId>[/...]`, if `topic` is one.
pub fn p2p_target(topic: &str) -> Option<&str> {
    let mut levels = topic.split('/');
    let _parent = levels.next()?;
    if levels.next()? != "p2p" {
        return None;
    }
    levels.next().filter(|target| !target.is_empty())
}

/// The first level of a topic or filter.
pub fn parent_of(topic: &str) -> &str {
    topic.split('/').next().unwrap_or(topic)
}

#[cfg(test)]
mod p2p_tests {
    use super::*;

    #[test]
    fn p2p_topics_name_their_target() {
        assert_eq!(p2p_target("demo/p2p/GID_a@@@d"), Some("GID_a@@@d"));
        assert_eq!(p2p_target("demo/p2p/GID_a@@@d/x"), Some("GID_a@@@d"));
        assert_eq!(p2p_target("demo/p2p"), None);
        assert_eq!(p2p_target("demo/p2p/"), None);
        assert_eq!(p2p_target("demo/x/y"), None);
        assert_eq!(parent_of("demo/x"), "demo");
    }
}
