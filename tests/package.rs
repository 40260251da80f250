//! The Debian package, as a DBA installs it: `scripts/package.sh` builds
//! it with cargo-deb (from the binary under test, so the suite needs no
//! second, release, build); its control fields and file list are checked
//! with `dpkg-deb`; it is installed with `dpkg -i` into a throwaway root
//! (maintainer scripts run outside a chroot, under `DPKG_ROOT`); then the
//! installed binary runs, the man pages render with `man -l`, the shipped
//! configuration parses, `systemd-analyze verify` passes every installed
//! unit and template instance, and removing the package keeps the
//! configuration and the spool directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::CommandFactory;

fn run(cmd: &mut Command) -> Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Builds the package from the walsafe binary under test; its path.
fn build_package(repo: &Path) -> PathBuf {
    let out = repo.join("target/debian");
    let _ = std::fs::remove_dir_all(&out);
    run(Command::new(repo.join("scripts/package.sh"))
        .current_dir(repo)
        .env("WALSAFE_DEB_BINARY", env!("CARGO_BIN_EXE_walsafe")));
    let debs: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one package in {}: {debs:?}", out.display());
    debs[0].clone()
}

/// The commands a DBA sees (each has a man page).
fn visible_commands() -> Vec<String> {
    walsafe::cmd::Cli::command()
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .map(|s| s.get_name().to_string())
        .collect()
}

fn units(repo: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo.join("systemd"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service") || n.ends_with(".timer"))
        .collect();
    names.sort();
    assert!(names.len() >= 7, "{names:?}");
    names
}

fn postgres_exists() -> bool {
    Command::new("getent")
        .args(["passwd", "postgres"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_debian_package_builds_installs_and_verifies() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let deb = build_package(&repo);

    // Control fields.
    let field = |name: &str| {
        stdout(&run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name)))
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "walsafe");
    assert_eq!(field("Version"), format!("{}-1", env!("CARGO_PKG_VERSION")));
    assert_eq!(field("Section"), "database");
    assert!(field("Depends").contains("libc6"), "{}", field("Depends"));
    assert!(field("Maintainer").contains('<'), "{}", field("Maintainer"));
    let synopsis = field("Description");
    let synopsis = synopsis.lines().next().unwrap();
    assert!(synopsis.len() < 80, "a short synopsis: {synopsis:?}");
    let control = stdout(&run(Command::new("dpkg-deb").arg("-I").arg(&deb)));
    assert!(control.contains("conffiles"), "{control}");
    let conffiles = stdout(&run(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles")));
    assert_eq!(conffiles.trim(), "/etc/walsafe/walsafe.toml");

    // The file list, with modes.
    let list = stdout(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)));
    let entry = |path: &str| {
        list.lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{list}"))
            .to_string()
    };
    assert!(entry("/usr/bin/walsafe").starts_with("-rwxr-xr-x 0/0 "));
    assert!(entry("/etc/walsafe/walsafe.toml").starts_with("-rw-r----- 0/0 "));
    entry("/usr/share/man/man1/walsafe.1.gz");
    for c in visible_commands() {
        entry(&format!("/usr/share/man/man1/walsafe-{c}.1.gz"));
    }
    entry("/usr/share/bash-completion/completions/walsafe");
    entry("/usr/share/zsh/vendor-completions/_walsafe");
    entry("/usr/share/fish/vendor_completions.d/walsafe.fish");
    entry("/usr/share/doc/walsafe/README.md");
    entry("/usr/share/doc/walsafe/copyright");
    let units = units(&repo);
    for u in &units {
        entry(&format!("/lib/systemd/system/{u}"));
        let (stem, ext) = u.rsplit_once('.').unwrap();
        entry(&format!("/lib/systemd/system/{stem}@.{ext}"));
    }
    assert!(
        !list.contains("walsafe-wal-prefetch") && !list.contains("walsafe-generate-assets"),
        "no pages for hidden commands:\n{list}"
    );

    // Installed into a throwaway root.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::write(r.join("var/lib/dpkg/status"), "").unwrap();
    let dpkg = |args: &[&str]| {
        run(Command::new("dpkg")
            .arg(format!("--root={}", r.display()))
            // (--path-include undoes a minimal image's man page excludes.)
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--log=/dev/null",
                "--path-include=/*",
            ])
            .args(args))
    };
    let installed = dpkg(&["-i", deb.to_str().unwrap()]);
    let said = stdout(&installed);
    assert!(said.contains("nothing was started"), "{said}");
    assert!(
        said.contains("walsafe check"),
        "postinst says what next: {said}"
    );
    let state = r.join("var/lib/walsafe");
    let meta = std::fs::metadata(&state).expect("postinst creates /var/lib/walsafe");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o750);
    let config = r.join("etc/walsafe/walsafe.toml");
    let cmeta = std::fs::metadata(&config).unwrap();
    assert_eq!(cmeta.permissions().mode() & 0o777, 0o640);
    if postgres_exists() {
        let gid = stdout(&run(Command::new("id").args(["-g", "postgres"])));
        let gid: u32 = gid.trim().parse().unwrap();
        assert_eq!(meta.gid(), gid, "/var/lib/walsafe belongs to postgres");
        assert_eq!(
            cmeta.gid(),
            gid,
            "the configuration is readable by postgres"
        );
    }
    // Nothing destructive: no key, no spool, no repository was made.
    assert!(!r.join("etc/walsafe/repository.key").exists());
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);

    let bin = r.join("usr/bin/walsafe");
    let version = stdout(&run(Command::new(&bin).arg("--version")));
    assert_eq!(
        version.trim(),
        format!("walsafe {}", env!("CARGO_PKG_VERSION"))
    );
    // The shipped configuration is valid as it stands.
    run(Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .arg("config"));

    for (page, expect) in [
        ("walsafe", "wal-fetch"),
        ("walsafe-wal-fetch", "restore_command"),
        ("walsafe-restore", "--target-time"),
    ] {
        let text = stdout(&run(Command::new("man")
            .arg("-l")
            .arg(r.join(format!("usr/share/man/man1/{page}.1.gz")))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")));
        assert!(
            text.contains(expect),
            "man {page} mentions {expect}:\n{text}"
        );
    }

    // systemd-analyze verify of every installed unit, the templates as an
    // instance. The root gets the distribution's targets and /bin/kill
    // (ExecReload), which the units refer to.
    let system = r.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&system).unwrap();
    for e in std::fs::read_dir("/lib/systemd/system").unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with(".target") {
            std::fs::copy(e.path(), system.join(e.file_name())).unwrap();
        }
    }
    std::fs::create_dir_all(r.join("bin")).unwrap();
    std::fs::copy("/bin/kill", r.join("bin/kill")).unwrap();
    let mut to_verify = Vec::new();
    for u in &units {
        let (stem, ext) = u.rsplit_once('.').unwrap();
        to_verify.push(u.clone());
        to_verify.push(format!("{stem}@main.{ext}"));
    }
    let verified = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .args(&to_verify)
        .current_dir(r));
    let complaints = format!(
        "{}{}",
        stdout(&verified),
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(
        complaints.trim().is_empty(),
        "systemd-analyze verify: {complaints}"
    );
    // A template instance reads its own configuration and keeps its own state.
    let template = std::fs::read_to_string(r.join("lib/systemd/system/walsafe@.service")).unwrap();
    assert!(
        template.contains("WALSAFE_CONFIG=/etc/walsafe/%i.toml"),
        "{template}"
    );
    assert!(template.contains("StateDirectory=walsafe/%i"), "{template}");
    assert!(
        template.contains("ExecStart=/usr/bin/walsafe run"),
        "{template}"
    );
    let backup =
        std::fs::read_to_string(r.join("lib/systemd/system/walsafe-backup@.service")).unwrap();
    assert!(
        backup.contains("After=network-online.target postgresql.service walsafe@%i.service"),
        "{backup}"
    );

    // Removing the package keeps the configuration and the spool directory.
    dpkg(&["-r", "walsafe"]);
    assert!(!bin.exists());
    assert!(config.exists(), "the configuration stays until purge");
    assert!(state.exists(), "the spool directory stays");
}
