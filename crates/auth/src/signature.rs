//! Signature mode (DESIGN.md 3.1): `Base64(HMAC-SHA1(key = secret, message))`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// The Signature-mode password for `message` (the client id, or the group id in legacy mode).
pub fn sign(secret: &str, message: &str) -> String {
    STANDARD.encode(hmac_sha1(secret, message))
}

fn hmac_sha1(secret: &str, message: &str) -> [u8; 20] {
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of every length");
    mac.update(message.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Whether `password` is the Signature-mode password for `message`, compared in constant time.
pub fn verify_signature(secret: &str, message: &str, password: &[u8]) -> bool {
    let expected = sign(secret, message);
    expected.as_bytes().ct_eq(password).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_design_example() {
        assert_eq!(
            sign("demo-secret", "GID_demo@@@dev-1"),
            "5vPUiwwywQkBwF4swW30o85MOqw="
        );
        assert!(verify_signature(
            "demo-secret",
            "GID_demo@@@dev-1",
            b"5vPUiwwywQkBwF4swW30o85MOqw="
        ));
        assert!(!verify_signature(
            "demo-secret",
            "GID_demo@@@dev-1",
            b"5vPUiwwywQkBwF4swW30o85MOqw"
        ));
        assert!(!verify_signature(
            "other",
            "GID_demo@@@dev-1",
            b"5vPUiwwywQkBwF4swW30o85MOqw="
        ));
    }
}
