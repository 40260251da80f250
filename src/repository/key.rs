//! The repository key: 32 random bytes that encrypt and authenticate every
//! object of an encrypted repository.
//!
//! # Key file format
//!
//! ```text
//! # walsafe repository key (key id 3f9c0a1b2c3d4e5f). Keep it secret; keep a copy
//! # off this host: without it the archived WAL cannot be read.
//! walsafe-key-v1 <64 lower-case hex digits>
//! ```
//!
//! Lines starting with `#` and blank lines are ignored; at least one
//! `walsafe-key-v1` line must remain. Text rather than raw bytes so that the
//! key survives being pasted into a secret manager and back.
//!
//! # Key ring
//!
//! A key file may hold several key lines: a ring ([`KeyRing`]). The first
//! key encrypts new objects; every key decrypts, each object naming its key
//! by id in its header. `walsafe keygen FILE --add` appends a new key
//! ([`add_key`]): it decrypts at once, and encrypts once it is moved first.
//!
//! # Invariants
//!
//! * The key never appears in `Debug`, `Display` or any error: they show
//!   the key id only.
//! * The key id is the first 8 bytes of HMAC-SHA256(key, "walsafe key id"):
//!   it identifies the key (objects and the repository descriptor record it)
//!   without revealing anything about it.
//! * [`write_key_file`] never overwrites an existing file (`O_CREAT|O_EXCL`),
//!   creates it with mode 0600 and makes it durable (file and directory
//!   fsync): losing a key loses the repository.
//! * The bytes are zeroed when a [`Key`] is dropped.
//!
//! # Permissions
//!
//! A key file readable by group or others is *accepted with a warning*, not
//! refused: secret mounts (Kubernetes, systemd credentials) often expose
//! files as 0644 inside a private directory, and refusing would push users
//! to copy the key somewhere worse. The warning names the file and the fix
//! (`chmod 600`).

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Length of a repository key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a key id in bytes.
pub const KEY_ID_LEN: usize = 8;
/// The tag that starts the key line of a key file.
pub const KEY_FILE_TAG: &str = "walsafe-key-v1";

/// A repository master key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_LEN]);

/// Why a key file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file does not exist.
    #[error("repository key file {path} does not exist; create one with `walsafe keygen {path}` (and keep a copy off this host), or remove key_file from [repository] for an unencrypted repository")]
    Missing { path: PathBuf },
    /// The key file exists but may not be read by this user.
    #[error("repository key file {path} cannot be read by this user ({source}); make it readable by the user walsafe runs as, e.g. `chown walsafe {path} && chmod 600 {path}`")]
    Unreadable { path: PathBuf, source: io::Error },
    /// Reading or writing the file failed for another reason.
    #[error("repository key file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The file does not have the `walsafe-key-v1 <hex>` line.
    #[error("repository key file {path} is malformed: {reason}; expected one line `walsafe-key-v1 <64 hex digits>` as written by `walsafe keygen`")]
    Malformed { path: PathBuf, reason: String },
    /// The key line holds a key of the wrong length.
    #[error("repository key file {path} holds a {found}-byte key; a walsafe key is 32 bytes (64 hex digits)")]
    WrongLength { path: PathBuf, found: usize },
    /// `write_key_file` refuses to replace an existing file.
    #[error("{path} already exists; walsafe never overwrites a key file (the repository it encrypts would become unreadable). Choose another path, or remove the file yourself if you are sure it is not in use")]
    AlreadyExists { path: PathBuf },
}

impl Key {
    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Key {
        let mut k = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Key(k)
    }

    /// A key from raw bytes (tests and key derivation).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(bytes)
    }

    /// The raw key material. Handle with care: never log it.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// First 8 bytes of HMAC-SHA256(key, "walsafe key id").
    pub fn key_id(&self) -> [u8; KEY_ID_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"walsafe key id");
        let out = mac.finalize().into_bytes();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&out[..KEY_ID_LEN]);
        id
    }

    /// The key id as 16 lower-case hex digits.
    pub fn key_id_hex(&self) -> String {
        hex::encode(self.key_id())
    }

    /// The key file's text.
    fn to_file_text(&self) -> String {
        format!(
            "# walsafe repository key (key id {}). Keep it secret; keep a copy\n\
             # off this host: without it the archived WAL cannot be read.\n\
             {KEY_FILE_TAG} {}\n",
            self.key_id_hex(),
            hex::encode(self.0)
        )
    }

    /// Parses one key line (`walsafe-key-v1 <hex>`); `path` names the
    /// file in errors.
    fn parse_line(line: &str, path: &Path) -> Result<Key, KeyError> {
        let malformed = |reason: &str| KeyError::Malformed {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let mut parts = line.split_whitespace();
        let tag = parts.next().unwrap_or_default();
        if tag != KEY_FILE_TAG {
            return Err(malformed(&format!(
                "a key line starts with {tag:?}, not {KEY_FILE_TAG:?}"
            )));
        }
        let hex_key = parts
            .next()
            .ok_or_else(|| malformed("a key line has no key after the tag"))?;
        if parts.next().is_some() {
            return Err(malformed("a key line has extra words after the key"));
        }
        let mut bytes = hex::decode(hex_key).map_err(|_| malformed("a key is not hex"))?;
        if bytes.len() != KEY_LEN {
            let found = bytes.len();
            bytes.iter_mut().for_each(|b| *b = 0);
            return Err(KeyError::WrongLength {
                path: path.to_path_buf(),
                found,
            });
        }
        let mut k = [0u8; KEY_LEN];
        k.copy_from_slice(&bytes);
        bytes.iter_mut().for_each(|b| *b = 0);
        Ok(Key(k))
    }
}

/// The keys of a key file, the first one current (see the module doc).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct KeyRing(Vec<Key>);

impl KeyRing {
    /// A ring of one key.
    pub fn single(key: Key) -> KeyRing {
        KeyRing(vec![key])
    }

    /// A ring of `keys`, the first current; `None` when empty.
    pub fn of(keys: Vec<Key>) -> Option<KeyRing> {
        (!keys.is_empty()).then_some(KeyRing(keys))
    }

    /// The key that encrypts new objects.
    pub fn current(&self) -> &Key {
        &self.0[0]
    }

    /// The key with id `id`, if the ring holds it.
    pub fn find(&self, id: &[u8; KEY_ID_LEN]) -> Option<&Key> {
        self.0.iter().find(|k| k.key_id() == *id)
    }

    /// The key whose id is `id` (hex), if the ring holds it.
    pub fn find_hex(&self, id: &str) -> Option<&Key> {
        self.0.iter().find(|k| k.key_id_hex() == id)
    }

    /// The ids among `ids` (hex) that the ring does not hold.
    pub fn lacking(&self, ids: impl IntoIterator<Item = String>) -> Vec<String> {
        ids.into_iter()
            .filter(|id| self.find_hex(id).is_none())
            .collect()
    }

    /// Every key id, current first, as hex.
    pub fn ids_hex(&self) -> Vec<String> {
        self.0.iter().map(Key::key_id_hex).collect()
    }

    /// The keys, current first.
    pub fn keys(&self) -> &[Key] {
        &self.0
    }

    /// The same keys with the one of id `id` (hex) first: it encrypts.
    /// `None` when the ring does not hold it.
    pub fn with_current(&self, id: &str) -> Option<KeyRing> {
        let k = self.find_hex(id)?.clone();
        let mut keys = vec![k.clone()];
        keys.extend(self.0.iter().filter(|x| **x != k).cloned());
        Some(KeyRing(keys))
    }

    /// The same keys without the one of id `id` (hex); `None` when that
    /// would leave none.
    pub fn without(&self, id: &str) -> Option<KeyRing> {
        KeyRing::of(
            self.0
                .iter()
                .filter(|k| k.key_id_hex() != id)
                .cloned()
                .collect(),
        )
    }

    /// The key file's text for this ring.
    fn to_file_text(&self) -> String {
        let mut text = String::from(
            "# walsafe repository key ring: the first key encrypts, every key decrypts.\n\
             # Keep it secret; keep a copy off this host: without its keys the archive\n\
             # cannot be read.\n",
        );
        for (i, k) in self.0.iter().enumerate() {
            let role = if i == 0 { " (current)" } else { "" };
            text.push_str(&format!(
                "# key id {}{role}\n{KEY_FILE_TAG} {}\n",
                k.key_id_hex(),
                hex::encode(k.0)
            ));
        }
        text
    }

    /// Parses a key file's text; `path` names it in errors.
    pub fn parse_file_text(text: &str, path: &Path) -> Result<KeyRing, KeyError> {
        let mut keys: Vec<Key> = Vec::new();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let k = Key::parse_line(line, path)?;
            if keys.contains(&k) {
                return Err(KeyError::Malformed {
                    path: path.to_path_buf(),
                    reason: format!("key id {} is in it twice", k.key_id_hex()),
                });
            }
            keys.push(k);
        }
        KeyRing::of(keys).ok_or_else(|| KeyError::Malformed {
            path: path.to_path_buf(),
            reason: "it has no key line".into(),
        })
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned &mut u8.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(id {})", self.key_id_hex())
    }
}

/// Writes `key` to a new file at `path`: never overwrites, mode 0600,
/// fsync of the file and of its directory.
pub fn write_key_file(path: &Path, key: &Key) -> Result<(), KeyError> {
    let io_err = |source: io::Error| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(KeyError::AlreadyExists {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(e)),
    };
    let result = (|| {
        // The umask may have narrowed the mode further; never widened it.
        f.write_all(key.to_file_text().as_bytes())?;
        crate::durable::Fsync::On.sync_all(&f)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        crate::durable::Fsync::On.sync_dir(dir)
    })();
    if let Err(e) = result {
        // A half-written key file is worse than none.
        let _ = std::fs::remove_file(path);
        return Err(io_err(e));
    }
    Ok(())
}

/// Appends `key` to the existing key file at `path` (a ring): it decrypts
/// from now on; the keys already there are never touched (the file is
/// opened for appending, then fsynced).
pub fn add_key(path: &Path, key: &Key) -> Result<(), KeyError> {
    let ring = load_key_ring(path)?;
    if ring.find(&key.key_id()).is_some() {
        return Err(KeyError::Malformed {
            path: path.to_path_buf(),
            reason: format!("key id {} is in it already", key.key_id_hex()),
        });
    }
    let io_err = |source: io::Error| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new().append(true).open(path).map_err(io_err)?;
    let text = format!(
        "# key id {} added {}\n{KEY_FILE_TAG} {}\n",
        key.key_id_hex(),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        hex::encode(key.0)
    );
    f.write_all(text.as_bytes()).map_err(io_err)?;
    crate::durable::Fsync::On.sync_all(&f).map_err(io_err)
}

/// Replaces the key file at `path` with `ring`, atomically: a new file
/// (mode 0600, the old file's owner) written and fsynced beside it, renamed
/// over it, the directory fsynced. A crash leaves the old ring or the new
/// one, never a mix. Used by `walsafe key-rotate`, which only reorders keys
/// or drops one no object needs.
pub fn rewrite_key_file(path: &Path, ring: &KeyRing) -> Result<(), KeyError> {
    use std::os::unix::fs::MetadataExt;
    let io_err = |source: io::Error| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".rotating");
    let tmp = dir.join(tmp_name);
    // What a crash in an earlier rotation left: never the key file itself.
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
        let mut text = ring.to_file_text();
        let written = f.write_all(text.as_bytes());
        // SAFETY: writing ASCII zeros keeps the String valid UTF-8.
        unsafe { text.as_bytes_mut().iter_mut().for_each(|b| *b = b'0') };
        written?;
        crate::durable::Fsync::On.sync_all(&f)?;
        std::fs::rename(&tmp, path)?;
        crate::durable::Fsync::On.sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

/// The current key of the key file at `path` (see [`load_key_ring`]).
pub fn load_key_file(path: &Path) -> Result<Key, KeyError> {
    load_key_ring(path).map(|r| r.current().clone())
}

/// Reads a key file written by [`write_key_file`] (and [`add_key`]).
/// Warns (does not refuse) when the file is readable by group or others.
pub fn load_key_ring(path: &Path) -> Result<KeyRing, KeyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return Err(match e.kind() {
                io::ErrorKind::NotFound => KeyError::Missing {
                    path: path.to_path_buf(),
                },
                io::ErrorKind::PermissionDenied => KeyError::Unreadable {
                    path: path.to_path_buf(),
                    source: e,
                },
                io::ErrorKind::InvalidData => KeyError::Malformed {
                    path: path.to_path_buf(),
                    reason: "it is not text".into(),
                },
                _ => KeyError::Io {
                    path: path.to_path_buf(),
                    source: e,
                },
            })
        }
    };
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "repository key file {} has mode {:o}: group or others may read it; run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
    let mut text = text;
    let key = KeyRing::parse_file_text(&text, path);
    // Do not leave the hex key lying around in freed memory.
    // SAFETY: writing ASCII zeros keeps the String valid UTF-8.
    unsafe { text.as_bytes_mut().iter_mut().for_each(|b| *b = b'0') };
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip_with_mode_0600() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("repo.key");
        let k = Key::generate();
        write_key_file(&p, &k).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(&k.key_id_hex()), "{text}");
        let loaded = load_key_file(&p).unwrap();
        assert_eq!(loaded, k);
    }

    /// A key file of key `a` with key `b` added.
    fn ring_of_two(d: &Path) -> (PathBuf, Key, Key) {
        let p = d.join("ring.key");
        let (a, b) = (Key::generate(), Key::generate());
        write_key_file(&p, &a).unwrap();
        add_key(&p, &b).unwrap();
        (p, a, b)
    }

    #[test]
    fn a_ring_decrypts_with_every_key_and_encrypts_with_the_first() {
        let d = tempfile::tempdir().unwrap();
        let (p, a, b) = ring_of_two(d.path());
        let ring = load_key_ring(&p).unwrap();
        assert_eq!(ring.current(), &a, "adding never changes the current key");
        assert_eq!(ring.find(&b.key_id()), Some(&b));
        assert_eq!(ring.ids_hex(), [a.key_id_hex(), b.key_id_hex()]);
        assert_eq!(load_key_file(&p).unwrap(), a);
        let err = add_key(&p, &b).unwrap_err().to_string();
        assert!(err.contains("already"), "{err}");
        // Moved first, the added key is current.
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(KEY_FILE_TAG))
            .collect();
        std::fs::write(&p, format!("{}\n{}\n", lines[1], lines[0])).unwrap();
        assert_eq!(load_key_ring(&p).unwrap().current(), &b);
        std::fs::write(&p, format!("{}\n{}\n", lines[0], lines[0])).unwrap();
        let err = load_key_ring(&p).unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn rewriting_a_ring_reorders_or_drops_keys_and_keeps_mode_0600() {
        let d = tempfile::tempdir().unwrap();
        let (p, a, b) = ring_of_two(d.path());
        let ring = load_key_ring(&p).unwrap();
        let rotated = ring.with_current(&b.key_id_hex()).unwrap();
        rewrite_key_file(&p, &rotated).unwrap();
        let back = load_key_ring(&p).unwrap();
        assert_eq!(back.ids_hex(), [b.key_id_hex(), a.key_id_hex()]);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let retired = back.without(&a.key_id_hex()).unwrap();
        rewrite_key_file(&p, &retired).unwrap();
        assert_eq!(load_key_ring(&p).unwrap().ids_hex(), [b.key_id_hex()]);
        assert!(retired.without(&b.key_id_hex()).is_none());
        assert!(ring.with_current("0000").is_none());
        let files: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "no staging file left");
    }

    #[test]
    fn never_overwrites_an_existing_key_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("repo.key");
        let k1 = Key::generate();
        write_key_file(&p, &k1).unwrap();
        let err = write_key_file(&p, &Key::generate()).unwrap_err();
        assert!(matches!(err, KeyError::AlreadyExists { .. }), "{err}");
        assert_eq!(load_key_file(&p).unwrap(), k1);
    }

    #[test]
    fn missing_file_names_keygen() {
        let d = tempfile::tempdir().unwrap();
        let err = load_key_file(&d.path().join("nope")).unwrap_err();
        assert!(matches!(err, KeyError::Missing { .. }));
        assert!(err.to_string().contains("walsafe keygen"), "{err}");
    }

    #[test]
    fn malformed_and_wrong_length_are_distinct() {
        let p = Path::new("/k");
        let e = KeyRing::parse_file_text("hello\n", p).unwrap_err();
        assert!(matches!(e, KeyError::Malformed { .. }), "{e}");
        let e = KeyRing::parse_file_text("walsafe-key-v1 zz\n", p).unwrap_err();
        assert!(matches!(e, KeyError::Malformed { .. }), "{e}");
        let e = KeyRing::parse_file_text("walsafe-key-v1 00ff\n", p).unwrap_err();
        assert!(matches!(e, KeyError::WrongLength { found: 2, .. }), "{e}");
        let e = KeyRing::parse_file_text("# only a comment\n", p).unwrap_err();
        assert!(matches!(e, KeyError::Malformed { .. }), "{e}");
        let two = format!(
            "{KEY_FILE_TAG} {}\n{KEY_FILE_TAG} {}\n",
            "00".repeat(32),
            "11".repeat(32)
        );
        // Two keys are a ring, the first current.
        let ring = KeyRing::parse_file_text(&two, p).unwrap();
        assert_eq!(ring.current().as_bytes(), &[0u8; 32]);
        assert_eq!(ring.ids_hex().len(), 2);
        let ok = format!("# c\n\n  {KEY_FILE_TAG}   {}  \n", "ab".repeat(32));
        assert_eq!(
            KeyRing::parse_file_text(&ok, p)
                .unwrap()
                .current()
                .as_bytes(),
            &[0xab; 32]
        );
    }

    #[test]
    fn debug_shows_only_the_key_id() {
        let k = Key::from_bytes([0x5a; 32]);
        let dbg = format!("{k:?}");
        assert!(dbg.contains(&k.key_id_hex()));
        assert!(!dbg.contains(&"5a".repeat(8)), "{dbg}");
        assert_ne!(k.key_id(), Key::from_bytes([0x5b; 32]).key_id());
        // The id is not a prefix of the key.
        assert_ne!(&k.key_id()[..], &k.as_bytes()[..8]);
    }

    #[test]
    fn a_directory_is_an_io_error_naming_the_path() {
        let d = tempfile::tempdir().unwrap();
        let e = load_key_file(d.path()).unwrap_err();
        assert!(matches!(e, KeyError::Io { .. }), "{e}");
        assert!(e.to_string().contains(&d.path().display().to_string()));
    }
}
