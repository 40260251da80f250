//! The README's first command must keep working: `walsafe demo` archives a
//! throwaway cluster, backs it up with `walsafe backup`, crashes it,
//! restores to a point in time with `walsafe restore --start` and checks
//! the rows.

mod common;

use std::process::Command;

#[test]
fn demo_restores_exactly_the_rows_before_the_target() {
    let dir = common::pg::TestDir::new("demo");
    let out = Command::new(common::walsafe::bin())
        .args(["demo", "--duration", "3s", "--dir"])
        .arg(dir.join("d"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("OK: the restore holds exactly the"),
        "{stdout}"
    );
    // walsafe's own path: `walsafe backup`, then `walsafe restore --start`.
    assert!(
        stdout.contains("backup ") && stdout.contains(" complete: "),
        "{stdout}"
    );
    assert!(
        stdout.contains("recovery ended: promoted") && stdout.contains("RTO"),
        "{stdout}"
    );
    assert!(
        stdout.contains("archived"),
        "live positions shown: {stdout}"
    );
    // It cleans up after itself: no files, and no process left running
    // (the agent it SIGKILLed is really gone, not a wrapper around it).
    assert!(!dir.join("d").exists());
    let needle = dir.join("d").to_string_lossy().into_owned();
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect();
    assert!(leftovers.is_empty(), "left running: {leftovers:?}");
}
