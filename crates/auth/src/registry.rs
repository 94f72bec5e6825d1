//! [`AuthRegistry`]: the tokens and device credentials issued at run time (DESIGN.md 3.2, 3.3).
//!
//! The admin API writes it (after the store has made the change durable, see `herald-admin`);
//! connection tasks read it at CONNECT and, for the connections that rely on it, again
//! whenever it changes ([`AuthRegistry::watch`] wakes them; no connection polls it). The maps
//! sit behind one std `RwLock` whose critical sections are a map lookup or insert: never held across an `.await`, never taken with another lock. Every change
//! that can take a right away (revoke, refresh, unregister) bumps [`AuthRegistry::generation`],
//! for readers that want to skip re-checks when nothing changed.
//!
//! The registry does not persist anything and knows no store types.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::Secret;

/// What a token or a connection's use of it allows: R (subscribe and receive), W (publish).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actions {
    pub read: bool,
    pub write: bool,
}

impl Actions {
    pub const READ: Actions = Actions {
        read: true,
        write: false,
    };
    pub const WRITE: Actions = Actions {
        read: false,
        write: true,
    };
    pub const READ_WRITE: Actions = Actions {
        read: true,
        write: true,
    };

    /// A token type of the password or of `$SYS/uploadToken`: `R`, `W` or `RW`.
    pub fn parse_type(text: &str) -> Option<Actions> {
        match text {
            "R" => Some(Actions::READ),
            "W" => Some(Actions::WRITE),
            "RW" => Some(Actions::READ_WRITE),
            _ => None,
        }
    }

    /// The `actions` of the admin API: `R`, `W` or `R,W` (`W,R` and `RW` are accepted too).
    pub fn parse_api(text: &str) -> Option<Actions> {
        match text {
            "R" => Some(Actions::READ),
            "W" => Some(Actions::WRITE),
            "R,W" | "W,R" | "RW" => Some(Actions::READ_WRITE),
            _ => None,
        }
    }

    /// As the admin API shows it.
    pub fn as_api(self) -> &'static str {
        match (self.read, self.write) {
            (true, true) => "R,W",
            (true, false) => "R",
            (false, true) => "W",
            (false, false) => "",
        }
    }

    /// Bit 1 read, bit 2 write (the stored form).
    pub fn bits(self) -> u8 {
        u8::from(self.read) | (u8::from(self.write) << 1)
    }

    pub fn from_bits(bits: u8) -> Actions {
        Actions {
            read: bits & 1 != 0,
            write: bits & 2 != 0,
        }
    }

    /// Whether everything `self` allows, `other` allows too.
    pub fn within(self, other: Actions) -> bool {
        (!self.read || other.read) && (!self.write || other.write)
    }
}

/// One issued token: the topic filters and actions it grants, and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub resources: Vec<String>,
    pub actions: Actions,
    /// ms since the Unix epoch.
    pub expire_at_ms: u64,
}

impl TokenGrant {
    pub fn valid_at(&self, now_ms: u64) -> bool {
        now_ms < self.expire_at_ms
    }
}

/// One device credential, bound to one client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredential {
    pub client_id: String,
    pub key_id: String,
    pub secret: Secret,
    pub created_at_ms: u64,
}

#[derive(Debug, Default)]
struct State {
    /// token → grant.
    tokens: HashMap<String, Arc<TokenGrant>>,
    /// client id → credential.
    credentials: HashMap<String, Arc<DeviceCredential>>,
    /// device access key id → client id.
    key_owners: HashMap<String, String>,
}

/// Tokens and device credentials, shared by the admin API and the connection tasks.
#[derive(Debug, Default)]
pub struct AuthRegistry {
    state: RwLock<State>,
    generation: AtomicU64,
    /// Woken with every bump of `generation`: connections that rely on the registry wait on
    /// it instead of polling.
    changes: Arc<tokio::sync::Notify>,
}

impl AuthRegistry {
    pub fn new() -> AuthRegistry {
        AuthRegistry::default()
    }

    // A panic while holding the lock cannot leave the maps half-updated (each write is one map
    // operation), so a poisoned lock is used as it is.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Bumped by every change that can take a right away.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Wakes everyone waiting on it at each change that can take a right away. Waiters
    /// enable their `notified` future ([`AuthRegistry::watch`]) before they read
    /// [`AuthRegistry::generation`], so that no change falls between the two.
    fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.changes.clone()
    }

    /// A notification of the next change, already enabled: a change from now on wakes it,
    /// however late it is first polled.
    pub fn watch(&self) -> Pin<Box<tokio::sync::futures::OwnedNotified>> {
        let mut watch = Box::pin(self.changes().notified_owned());
        watch.as_mut().enable();
        watch
    }

    fn revoked(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.changes.notify_waiters();
    }

    pub fn token(&self, token: &str) -> Option<Arc<TokenGrant>> {
        self.read().tokens.get(token).cloned()
    }

    pub fn insert_token(&self, token: String, grant: TokenGrant) {
        self.write().tokens.insert(token, Arc::new(grant));
    }

    /// Forgets a token; the connections that rely on it end at once. Forgetting one that has
    /// expired wakes nobody: its connections ended at its expiry.
    pub fn remove_token(&self, token: &str) -> Option<Arc<TokenGrant>> {
        let removed = self.write().tokens.remove(token);
        if removed
            .as_ref()
            .is_some_and(|grant| grant.valid_at(crate::now_ms()))
        {
            self.revoked();
        }
        removed
    }

    /// Tokens that expired before `before_ms` (to be deleted for good).
    pub fn tokens_expired_before(&self, before_ms: u64) -> Vec<String> {
        self.read()
            .tokens
            .iter()
            .filter(|(_, grant)| grant.expire_at_ms < before_ms)
            .map(|(token, _)| token.clone())
            .collect()
    }

    pub fn credential_of_client(&self, client_id: &str) -> Option<Arc<DeviceCredential>> {
        self.read().credentials.get(client_id).cloned()
    }

    pub fn credential_of_key(&self, key_id: &str) -> Option<Arc<DeviceCredential>> {
        let state = self.read();
        let client = state.key_owners.get(key_id)?;
        state.credentials.get(client).cloned()
    }

    /// Adds a credential unless its client id already has one; returns whether it was added.
    pub fn insert_credential(&self, credential: DeviceCredential) -> bool {
        let mut state = self.write();
        if state.credentials.contains_key(&credential.client_id) {
            return false;
        }
        put_credential(&mut state, credential);
        true
    }

    /// Replaces the credential of its client id (refresh): the old secret stops working now.
    pub fn replace_credential(&self, credential: DeviceCredential) {
        let mut state = self.write();
        if let Some(old) = state.credentials.get(&credential.client_id).cloned() {
            state.key_owners.remove(&old.key_id);
        }
        put_credential(&mut state, credential);
        drop(state);
        self.revoked();
    }

    pub fn remove_credential(&self, client_id: &str) -> Option<Arc<DeviceCredential>> {
        let mut state = self.write();
        let removed = state.credentials.remove(client_id);
        if let Some(old) = &removed {
            state.key_owners.remove(&old.key_id);
        }
        drop(state);
        if removed.is_some() {
            self.revoked();
        }
        removed
    }
}

fn put_credential(state: &mut State, credential: DeviceCredential) {
    state
        .key_owners
        .insert(credential.key_id.clone(), credential.client_id.clone());
    state
        .credentials
        .insert(credential.client_id.clone(), Arc::new(credential));
}
