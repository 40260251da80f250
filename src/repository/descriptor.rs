//! The repository descriptor: `walsafe.repo`, the one object that says whose
//! WAL a repository holds.
//!
//! ```json
//! {
//!   "format": 1,
//!   "system_identifier": "7301234567890123456",   // a string: u64 exceeds JSON's safe integers
//!   "pg_version_num": 150007,
//!   "segment_size": 16777216,
//!   "key_id": "3f9c0a1b2c3d4e5f",                 // null for an unencrypted repository
//!   "key_ids": ["3f9c0a1b2c3d4e5f", "77ab…"],     // format 2 only: every key objects may need
//!   "compression": "zstd",
//!   "created_at": "2025-01-01T00:00:00Z",
//!   "created_by": "walsafe 0.1.0 on db1",
//!   "hmac": "…64 hex…"                            // only with a key
//! }
//! ```
//!
//! # Invariants
//!
//! * Written once, create-only, by the first agent (or `wal-push`) that
//!   meets an empty repository (format 1). Only `walsafe key-rotate
//!   --apply` rewrites it (format 2, [`Descriptor::signed_by`]): signed by
//!   the key that encrypts now (`key_id`), listing in `key_ids` every key
//!   that has encrypted and was not retired since (current first): the
//!   keys objects may need, so that a ring missing one is found without
//!   reading every object, and so that a key of the ring not listed is
//!   one never used (the next to make current). The identity never
//!   changes. A format-1 descriptor's objects need `key_id`. Every later writer
//!   compares its cluster's identity with it and refuses to archive a
//!   stranger's WAL (rule 5 of README's Guarantees).
//! * With a key, `hmac` = HMAC-SHA256 under a key derived from the master
//!   key (HKDF-SHA256, info "walsafe descriptor v1") over the descriptor's
//!   JSON serialisation without the `hmac` field (fields in the order
//!   above, compact). Anyone who can write the bucket but lacks the key
//!   cannot re-pin the repository to another cluster. Without a key the
//!   descriptor guards against mistakes, not attackers.
//! * `compression` records the choice at creation, for information; each
//!   object's header is what readers obey.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::key::Key;
use crate::pg::ClusterIdentity;

/// The descriptor format written at creation.
pub const DESCRIPTOR_FORMAT: u32 = 1;
/// The format of a descriptor that lists its keys (`key_ids`); the newest
/// this code reads.
pub const DESCRIPTOR_FORMAT_KEYS: u32 = 2;

/// The content of `walsafe.repo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    pub format: u32,
    #[serde(with = "u64_as_string")]
    pub system_identifier: u64,
    pub pg_version_num: u32,
    pub segment_size: u64,
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ids: Option<Vec<String>>,
    pub compression: String,
    pub created_at: String,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac: Option<String>,
}

/// Why `walsafe.repo` cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// Not valid descriptor JSON.
    #[error("walsafe.repo is not a valid repository descriptor: {reason}")]
    Invalid { reason: String },
    /// Written by a newer walsafe.
    #[error("walsafe.repo has format {found}; this walsafe understands formats {DESCRIPTOR_FORMAT} and {DESCRIPTOR_FORMAT_KEYS}: upgrade walsafe")]
    UnsupportedFormat { found: u64 },
}

pub(crate) mod u64_as_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn hostname() -> String {
    match nix::unistd::gethostname() {
        Ok(name) => name.to_string_lossy().into_owned(),
        Err(_) => "unknown host".into(),
    }
}

fn mac_key(key: &Key) -> [u8; 32] {
    let mut k = [0u8; 32];
    Hkdf::<Sha256>::new(None, key.as_bytes())
        .expand(b"walsafe descriptor v1", &mut k)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    k
}

impl Descriptor {
    /// A new descriptor for `identity`, signed when `key` is given.
    pub fn new(identity: &ClusterIdentity, key: Option<&Key>, compression: &str) -> Descriptor {
        let mut d = Descriptor {
            format: DESCRIPTOR_FORMAT,
            system_identifier: identity.system_identifier,
            pg_version_num: identity.pg_version_num,
            segment_size: identity.segment_size,
            key_id: key.map(Key::key_id_hex),
            key_ids: None,
            compression: compression.to_string(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            created_by: format!("walsafe {} on {}", env!("CARGO_PKG_VERSION"), hostname()),
            hmac: None,
        };
        if let Some(k) = key {
            d.hmac = Some(d.compute_mac(k));
        }
        d
    }

    /// Every key id the repository's objects may need, current first.
    pub fn keys_in_use(&self) -> Vec<String> {
        match (&self.key_ids, &self.key_id) {
            (Some(ids), _) => ids.clone(),
            (None, Some(id)) => vec![id.clone()],
            (None, None) => Vec::new(),
        }
    }

    /// This descriptor signed by `key` (which encrypts now), listing
    /// `key_ids` (`key` first, then the others in their order, each once).
    pub fn signed_by(&self, key: &Key, key_ids: &[String]) -> Descriptor {
        let current = key.key_id_hex();
        let mut ids = vec![current.clone()];
        for id in key_ids {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        let mut d = Descriptor {
            format: DESCRIPTOR_FORMAT_KEYS,
            key_id: Some(current),
            key_ids: Some(ids),
            hmac: None,
            ..self.clone()
        };
        d.hmac = Some(d.compute_mac(key));
        d
    }

    /// The cluster identity recorded.
    pub fn identity(&self) -> ClusterIdentity {
        ClusterIdentity::new(
            self.system_identifier,
            self.pg_version_num,
            self.segment_size,
        )
    }

    fn compute_mac(&self, key: &Key) -> String {
        let unsigned = Descriptor {
            hmac: None,
            ..self.clone()
        };
        let bytes = serde_json::to_vec(&unsigned).expect("descriptor serialises");
        let mut k = mac_key(key);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&k).expect("any key length");
        k.iter_mut().for_each(|b| *b = 0);
        mac.update(&bytes);
        hex::encode(mac.finalize().into_bytes())
    }

    /// True when `hmac` is present and was made with `key` over this content.
    pub fn mac_is_valid(&self, key: &Key) -> bool {
        let Some(found) = &self.hmac else {
            return false;
        };
        let Ok(found) = hex::decode(found) else {
            return false;
        };
        let expected = hex::decode(self.compute_mac(key)).expect("hex we made");
        // Constant-time comparison.
        found.len() == expected.len()
            && found
                .iter()
                .zip(&expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// The JSON written to `walsafe.repo` (pretty, trailing newline).
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("descriptor serialises");
        v.push(b'\n');
        v
    }

    /// Parses `walsafe.repo`.
    pub fn parse(bytes: &[u8]) -> Result<Descriptor, DescriptorError> {
        let invalid = |e: serde_json::Error| DescriptorError::Invalid {
            reason: e.to_string(),
        };
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(invalid)?;
        match value.get("format").and_then(|f| f.as_u64()) {
            Some(f) if f == DESCRIPTOR_FORMAT as u64 || f == DESCRIPTOR_FORMAT_KEYS as u64 => {}
            Some(f) => return Err(DescriptorError::UnsupportedFormat { found: f }),
            None => {
                return Err(DescriptorError::Invalid {
                    reason: "no numeric \"format\" field".into(),
                })
            }
        }
        serde_json::from_value(value).map_err(invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident() -> ClusterIdentity {
        ClusterIdentity::new(7_301_234_567_890_123_456, 150007, 16 << 20)
    }

    #[test]
    fn round_trip_and_system_identifier_as_string() {
        let d = Descriptor::new(&ident(), None, "zstd");
        let json = d.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.contains("\"system_identifier\": \"7301234567890123456\""),
            "{text}"
        );
        assert!(!text.contains("hmac"));
        assert_eq!(Descriptor::parse(&json).unwrap(), d);
        assert_eq!(d.identity(), ident());
    }

    #[test]
    fn mac_detects_tampering_and_wrong_key() {
        let k = Key::generate();
        let d = Descriptor::new(&ident(), Some(&k), "zstd");
        assert_eq!(d.key_id.as_deref(), Some(k.key_id_hex().as_str()));
        assert!(d.mac_is_valid(&k));
        let parsed = Descriptor::parse(&d.to_json()).unwrap();
        assert!(parsed.mac_is_valid(&k));
        let mut t = parsed.clone();
        t.system_identifier += 1;
        assert!(!t.mac_is_valid(&k));
        assert!(!parsed.mac_is_valid(&Key::generate()));
        let mut none = parsed;
        none.hmac = None;
        assert!(!none.mac_is_valid(&k));
    }

    #[test]
    fn signed_by_another_key_lists_the_keys_and_keeps_the_identity() {
        let (a, b) = (Key::generate(), Key::generate());
        let d = Descriptor::new(&ident(), Some(&a), "zstd");
        assert_eq!(d.keys_in_use(), [a.key_id_hex()]);
        let r = d.signed_by(&b, &[a.key_id_hex(), b.key_id_hex()]);
        assert_eq!(r.format, DESCRIPTOR_FORMAT_KEYS);
        assert_eq!(r.keys_in_use(), [b.key_id_hex(), a.key_id_hex()]);
        assert_eq!(r.identity(), d.identity());
        let parsed = Descriptor::parse(&r.to_json()).unwrap();
        assert!(parsed.mac_is_valid(&b));
        assert!(!parsed.mac_is_valid(&a));
        // The list is authenticated: dropping a key from it breaks the MAC.
        let mut t = parsed;
        t.key_ids = Some(vec![b.key_id_hex()]);
        assert!(!t.mac_is_valid(&b));
    }

    #[test]
    fn parse_errors() {
        assert!(matches!(
            Descriptor::parse(b"not json"),
            Err(DescriptorError::Invalid { .. })
        ));
        assert_eq!(
            Descriptor::parse(br#"{"format": 7}"#),
            Err(DescriptorError::UnsupportedFormat { found: 7 })
        );
        assert!(matches!(
            Descriptor::parse(br#"{"format": 1}"#),
            Err(DescriptorError::Invalid { .. })
        ));
    }
}
