//! `walsafe key-rotate [--rewrite] [--retire KEYID] [--apply]`: the
//! command-line side of [`crate::rekey`].
//!
//! For each encrypted repository:
//!
//! 1. **Make the new key current.** The new key is the last one in the key
//!    file that the repository descriptor does not list yet (added with
//!    `walsafe keygen FILE --add`, never current: the descriptor lists every
//!    key that has encrypted until it is retired); its line is moved first
//!    ([`key::rewrite_key_file`]: atomic), the descriptor is re-signed
//!    listing it, and a running agent is sent `SIGHUP` (as `systemctl
//!    reload walsafe` would) and awaited until its state file says it
//!    encrypts with it.
//! 2. **`--rewrite`**: every object under another key is re-encrypted
//!    under the current one ([`crate::rekey::rewrite`]).
//! 3. **`--retire KEYID`**: refused while any object still needs the key,
//!    while it is current, or while the running agent still encrypts with
//!    it; otherwise the descriptor stops listing it and, once every
//!    repository sharing the key file agreed, its line leaves the file.
//!
//! Without `--apply` nothing changes: the plan is printed with the objects
//! and bytes each key protects. Exit codes: 0 planned or done; 1 refused
//! or failed (what was done before a failure stays done; the next run
//! finishes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};

use crate::config::Config;
use crate::rekey::{self, Census, UNENCRYPTED};
use crate::report::{error_line, human_bytes};
use crate::repository::{key, Repository, RepositoryConfig};

/// How long to wait for a running agent to take up a new key.
const AGENT_RELOAD_WAIT: Duration = Duration::from_secs(20);

/// What `key-rotate` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct Asked {
    pub rewrite: bool,
    pub retire: Option<String>,
    pub apply: bool,
}

/// `walsafe key-rotate`.
pub async fn command(cfg: Config, asked: Asked) -> ExitCode {
    let mut failed = false;
    // Per key file: whether every repository using it may lose `--retire`'s key.
    let mut retire_ok: BTreeMap<PathBuf, bool> = BTreeMap::new();
    if cfg.repositories.iter().all(|r| r.key_file.is_none()) {
        eprintln!("walsafe key-rotate: no repository has a key_file: nothing is encrypted, so there is no key to rotate");
        return ExitCode::FAILURE;
    }
    for rc in &cfg.repositories {
        let Some(path) = &rc.key_file else {
            println!(
                "repository {:?} is not encrypted (no key_file): passed over",
                rc.name
            );
            continue;
        };
        println!(
            "repository {:?} ({}), key file {}:",
            rc.name,
            rc.url,
            path.display()
        );
        let r = rotate(&cfg, rc, path, &asked).await;
        if let Err(e) = &r {
            failed = true;
            eprintln!(
                "walsafe key-rotate: repository {:?}: {}",
                rc.name,
                error_line(e)
            );
        }
        let ok = retire_ok.entry(path.clone()).or_insert(true);
        *ok &= r.is_ok();
    }
    if let (Some(id), true) = (&asked.retire, asked.apply) {
        for (path, ok) in retire_ok {
            if !ok {
                eprintln!(
                    "walsafe key-rotate: key id {id} stays in {}: a repository using it refused or failed (above)",
                    path.display()
                );
                continue;
            }
            if let Err(e) = remove_from_file(&path, id) {
                failed = true;
                eprintln!("walsafe key-rotate: {}", error_line(&e));
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Removes key `id` from the key file at `path`.
fn remove_from_file(path: &Path, id: &str) -> anyhow::Result<()> {
    let ring = key::load_key_ring(path)?;
    if ring.find_hex(id).is_none() {
        return Ok(());
    }
    let rest = ring
        .without(id)
        .ok_or_else(|| anyhow!("{id} is the only key in {}", path.display()))?;
    key::rewrite_key_file(path, &rest)?;
    println!(
        "retired key id {id}: removed from {} (keys left: {}); destroy your off-host copies of it only once you no longer need old backups of the key file",
        path.display(),
        rest.ids_hex().join(", ")
    );
    Ok(())
}

/// One repository's rotation (see the module doc).
async fn rotate(
    cfg: &Config,
    rc: &RepositoryConfig,
    path: &Path,
    asked: &Asked,
) -> anyhow::Result<()> {
    let repo = Repository::open(rc)?;
    let ring = key::load_key_ring(path)?;
    let Some(descriptor) = repo.descriptor().await? else {
        bail!("nothing was ever archived to it (no walsafe.repo): there is nothing to rotate yet; the first key of the key file encrypts from the start")
    };
    repo.verify_descriptor(&descriptor, None)?;
    let in_use = descriptor.keys_in_use();
    let current = ring.current().key_id_hex();
    // The key to encrypt with: the current one when the descriptor does
    // not list it yet (moved first by hand), else the newest never used.
    let target = if in_use.contains(&current) {
        ring.ids_hex()
            .into_iter()
            .rev()
            .find(|id| !in_use.contains(id))
            .unwrap_or_else(|| current.clone())
    } else {
        current.clone()
    };
    let census = rekey::census(&repo).await?;
    print_keys(&census, &ring, &current, &target);
    let unreadable = ring.lacking(census.keys());
    if !unreadable.is_empty() {
        bail!(
            "objects need key id(s) {} which {} lacks: add the key(s) back (from your copy off this host) before rotating",
            unreadable.join(", "),
            path.display()
        );
    }
    if target == current {
        println!(
            "  key {current} stays current (no new key in the file: add one with `walsafe keygen {} --add`)",
            path.display()
        );
    } else {
        println!("  makes key {target} current: it was added to the ring and has never encrypted");
    }
    if asked.rewrite {
        let old = census.not_under(&target);
        println!(
            "  --rewrite: re-encrypts {} objects ({}) under key {target}",
            old.objects,
            human_bytes(old.bytes)
        );
    }
    if let Some(id) = &asked.retire {
        check_retirable(&census, &ring, id, &target, asked.rewrite)?;
        println!(
            "  --retire: removes key {id} from the ring and the descriptor{}",
            if asked.rewrite {
                " once the rewrite leaves no object under it"
            } else {
                ""
            }
        );
    }
    if !asked.apply {
        println!("  dry run: nothing changed; run again with --apply");
        return Ok(());
    }

    let started = Instant::now();
    // Every key that has encrypted stays listed until it is retired.
    let listed = |census: &Census| {
        let mut ids = vec![target.clone()];
        ids.extend(in_use.iter().cloned());
        ids.extend(census.keys());
        ids
    };
    let keys_needed = listed(&census);
    if target != current {
        let rotated = ring
            .with_current(&target)
            .expect("the target is a key of the ring");
        // The file first: a crash before the descriptor lists the key
        // leaves it current and unlisted, which the next run records.
        key::rewrite_key_file(path, &rotated)?;
        repo.set_ring(rotated);
        repo.record_keys(&keys_needed).await?;
        println!("  key {target} is now current in {}", path.display());
    } else {
        repo.record_keys(&keys_needed).await?;
    }
    reload_agent(cfg, &rc.name, &target).await?;
    if asked.rewrite {
        let mut progress = super::progress::on_stderr("key rotation");
        let done = rekey::rewrite(&repo, &census, progress.as_mut()).await?;
        drop(progress);
        println!(
            "  re-encrypted {} objects ({}) under key {target} in {:.1} s{}{}",
            done.objects,
            human_bytes(done.bytes),
            started.elapsed().as_secs_f64(),
            if done.gone > 0 {
                format!("; {} were deleted meanwhile and stay deleted", done.gone)
            } else {
                String::new()
            },
            if done.skipped > 0 {
                format!(
                    "; {} parts of backups without a record (being taken, or abandoned) left as they are",
                    done.skipped
                )
            } else {
                String::new()
            }
        );
    }
    if !asked.rewrite && asked.retire.is_none() {
        return Ok(());
    }
    let after = rekey::census(&repo).await?;
    let left = after.not_under(&target);
    println!(
        "  now: {} objects ({}) under key {target}, {} ({}) under older keys",
        after.of(&target).objects,
        human_bytes(after.of(&target).bytes),
        left.objects,
        human_bytes(left.bytes)
    );
    let mut keys_needed = listed(&after);
    if let Some(id) = &asked.retire {
        check_retirable(&after, &ring, id, &target, false)?;
        check_agent_not_using(cfg, &rc.name, id)?;
        keys_needed.retain(|k| k != id);
    }
    repo.record_keys(&keys_needed).await?;
    Ok(())
}

/// Prints each key with what it protects.
fn print_keys(census: &Census, ring: &key::KeyRing, current: &str, target: &str) {
    let line = |id: &str, role: &str| {
        let t = census.of(id);
        println!(
            "  key {id}  {role:<32} {:>8} objects  {:>10}",
            t.objects,
            human_bytes(t.bytes)
        );
    };
    for id in ring.ids_hex() {
        let role = match (id == current, id == target) {
            (true, true) => "current",
            (true, false) => "current, older after the rotation",
            (false, true) => "new: becomes current",
            (false, false) => "older",
        };
        line(&id, role);
    }
    for id in ring.lacking(census.keys()) {
        line(&id, "NOT IN THE KEY FILE");
    }
    if census.of(UNENCRYPTED).objects > 0 {
        line(UNENCRYPTED, "unencrypted");
    }
}

/// Refuses to retire `id` when it is not in the ring, is (or becomes)
/// current, or protects objects that a rewrite will not move.
fn check_retirable(
    census: &Census,
    ring: &key::KeyRing,
    id: &str,
    target: &str,
    rewriting: bool,
) -> anyhow::Result<()> {
    if ring.find_hex(id).is_none() {
        bail!(
            "cannot retire key id {id}: the key file does not hold it (keys: {})",
            ring.ids_hex().join(", ")
        );
    }
    if id == target {
        bail!("cannot retire key id {id}: it encrypts new objects; add a new key (`walsafe keygen FILE --add`), rotate to it with --rewrite --apply, then retire this one");
    }
    let needs = census.of(id);
    if needs.objects > 0 && !rewriting {
        bail!(
            "cannot retire key id {id}: {} objects ({}) still need it; re-encrypt them first with `walsafe key-rotate --rewrite --apply`",
            needs.objects,
            human_bytes(needs.bytes)
        );
    }
    Ok(())
}

/// The running agent's key for repository `name`: `(pid, key id)`.
fn agent_key(cfg: &Config, name: &str) -> Option<(u32, Option<String>)> {
    let state = crate::state::read(&cfg.spool.dir)?;
    if !state.is_live() {
        return None;
    }
    let key = state
        .repositories
        .iter()
        .find(|r| r.name == name)
        .and_then(|r| r.encrypting_key_id.clone());
    Some((state.pid, key))
}

/// Refuses while the running agent encrypts repository `name` with `id`.
fn check_agent_not_using(cfg: &Config, name: &str, id: &str) -> anyhow::Result<()> {
    if let Some((pid, Some(k))) = agent_key(cfg, name) {
        if k == id {
            bail!("cannot retire key id {id}: the running agent (pid {pid}) still encrypts with it; reload it (`systemctl reload walsafe`) and run again");
        }
    }
    Ok(())
}

/// Has a running agent read its key files again (SIGHUP), and waits until
/// it says it encrypts repository `name` with `target`.
async fn reload_agent(cfg: &Config, name: &str, target: &str) -> anyhow::Result<()> {
    let Some((pid, key)) = agent_key(cfg, name) else {
        println!("  no agent is running on this host's spool: it takes key {target} up when it starts (or on `systemctl reload walsafe`)");
        return Ok(());
    };
    if key.as_deref() == Some(target) {
        return Ok(());
    }
    let pid_t = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid_t, nix::sys::signal::Signal::SIGHUP).map_err(|e| {
        anyhow!("cannot signal the running agent (pid {pid}) to read its key file again ({e}); run `systemctl reload walsafe`")
    })?;
    let deadline = Instant::now() + AGENT_RELOAD_WAIT;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        match agent_key(cfg, name) {
            Some((_, Some(k))) if k == target => {
                println!("  the running agent (pid {pid}) now encrypts with key {target}");
                return Ok(());
            }
            None => return Ok(()),
            _ => {}
        }
    }
    bail!("the running agent (pid {pid}) was sent SIGHUP but does not say it encrypts with key {target} after {} s; check its log (a key file it cannot read?)", AGENT_RELOAD_WAIT.as_secs())
}
