//! walsafe as a systemd service: the sd_notify protocol (READY once
//! streaming, STATUS lines, watchdog pings), SIGHUP reopening the log file,
//! SIGTERM exiting 0, and the unit file itself.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::{PgCluster, PgOptions, TestDir};
use common::walsafe::{bin_copy, Settings};

#[test]
fn notify_protocol_log_reopen_and_clean_stop() {
    let pg = PgCluster::start(&PgOptions {
        name: "svc".into(),
        ..Default::default()
    });
    let dir = TestDir::new("svc");
    let settings = Settings::new(dir.path(), &pg.conninfo());
    let config = settings.write(&dir.join("walsafe.toml"));
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    common::pg::chown_postgres(&sock_path);
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = dir.join("walsafe.log");

    let mut cmd = Command::new(bin_copy(dir.path()));
    common::pg::as_postgres(&mut cmd);
    let mut child = cmd
        .arg("--config")
        .arg(&config)
        .arg("--log-file")
        .arg(&log)
        .arg("run")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::<String>::new();
    let until = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let all = seen.join("\n");
        if all.contains("READY=1") && all.contains("WATCHDOG=1") && all.contains("STATUS=streaming")
        {
            break;
        }
    }
    let all = seen.join("\n");
    assert!(all.contains("READY=1"), "no READY: {all}");
    assert!(
        all.contains("STATUS=streaming timeline 1"),
        "no STATUS: {all}"
    );
    assert!(all.contains("WATCHDOG=1"), "no watchdog ping: {all}");
    assert!(
        all.find("READY=1") < all.find("WATCHDOG=1").map(|i| i + 1),
        "READY before the first ping"
    );

    // SIGHUP reopens the log file after logrotate moved it.
    assert!(std::fs::read_to_string(&log).unwrap().contains("connected"));
    std::fs::rename(&log, dir.join("walsafe.log.1")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert!(common::walsafe::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("log file reopened"))
    }));

    // SIGTERM: orderly stop, exit 0, STOPPING=1 announced.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    while let Ok(n) = sock.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(status.success(), "exit status {status}");
    assert!(seen.join("\n").contains("STOPPING=1"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("SIGTERM") && text.contains("stopped"),
        "{text}"
    );
}

#[test]
fn unit_file_is_a_hardened_notify_service() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/walsafe.service"
    ))
    .unwrap();
    let has = |l: &str| unit.lines().any(|x| x.trim() == l);
    for line in [
        "Type=notify",
        "Restart=always",
        "User=postgres",
        "ProtectSystem=strict",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
        "ProtectHome=true",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "ReadWritePaths=/var/lib/walsafe",
    ] {
        assert!(has(line), "{line} missing from the unit");
    }
    assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")));
    systemd_accepts(&[("walsafe.service", &unit)]);
}

/// When systemd's own checker is on this machine, it must accept the
/// units (with ExecStart pointing at the binary under test).
fn systemd_accepts(units: &[(&str, &str)]) {
    let available = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        return;
    }
    let dir = TestDir::new("unit");
    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify");
    for (name, text) in units {
        let path = dir.join(name);
        std::fs::write(
            &path,
            text.replace(
                "/usr/local/bin/walsafe",
                common::walsafe::bin().to_str().unwrap(),
            ),
        )
        .unwrap();
        verify.arg(&path);
    }
    let v = verify.output().unwrap();
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(v.status.success(), "systemd-analyze verify: {err}");
}

/// The daily backup: a hardened oneshot unit and its timer, accepted by
/// systemd's own checker when it is on this machine.
#[test]
fn backup_unit_and_timer_are_hardened_and_daily() {
    let read = |name: &str| {
        std::fs::read_to_string(format!("{}/systemd/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let unit = read("walsafe-backup.service");
    let timer = read("walsafe-backup.timer");
    let has = |text: &str, l: &str| text.lines().any(|x| x.trim() == l);
    for line in [
        "Type=oneshot",
        "User=postgres",
        "ExecStart=/usr/local/bin/walsafe backup --checkpoint spread",
        "ProtectSystem=strict",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
        "ProtectHome=true",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute=true",
    ] {
        assert!(
            has(&unit, line),
            "{line} missing from walsafe-backup.service"
        );
    }
    assert!(has(&timer, "OnCalendar=*-*-* 02:00:00"), "daily by default");
    assert!(has(&timer, "Persistent=true"));
    systemd_accepts(&[
        ("walsafe-backup.service", &unit),
        ("walsafe-backup.timer", &timer),
    ]);
}

/// A timer's oneshot unit beside the backup's: `exec` is its ExecStart,
/// every hardening line of walsafe-backup.service is in it, its timer
/// runs `on_calendar` and catches up after downtime, and systemd accepts
/// both when its checker is on this machine.
fn hardened_like_the_backup(name: &str, exec: &str, on_calendar: &str) {
    let read = |name: &str| {
        std::fs::read_to_string(format!("{}/systemd/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let (service, timer) = (format!("{name}.service"), format!("{name}.timer"));
    let unit = read(&service);
    let timer_text = read(&timer);
    let backup = read("walsafe-backup.service");
    let has = |text: &str, l: &str| text.lines().any(|x| x.trim() == l);
    assert!(
        has(&unit, &format!("ExecStart={exec}")),
        "{service}: {exec}"
    );
    let hardening = &backup[backup.find("ProtectSystem=").unwrap()..];
    for line in hardening.lines().filter(|l| l.contains('=')) {
        assert!(has(&unit, line.trim()), "{line} missing from {service}");
    }
    assert!(has(&timer_text, &format!("OnCalendar={on_calendar}")));
    assert!(has(&timer_text, "Persistent=true"));
    systemd_accepts(&[(&service, &unit), (&timer, &timer_text)]);
}

/// The weekly drill: hardened like the backup's unit (PrivateTmp holds
/// its copy).
#[test]
fn drill_unit_and_timer_are_hardened_and_weekly() {
    hardened_like_the_backup(
        "walsafe-drill",
        "/usr/local/bin/walsafe drill --dir /var/tmp",
        "Sun *-*-* 06:00:00",
    );
}

/// Daily retention: hardened like the backup's unit, after it.
#[test]
fn retain_unit_and_timer_are_hardened_and_daily() {
    hardened_like_the_backup(
        "walsafe-retain",
        "/usr/local/bin/walsafe retain --window 14d --keep 2 --apply",
        "*-*-* 05:00:00",
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = TestDir::new("jsonlog");
    let port = common::walsafe::free_port();
    let mut s = Settings::new(
        dir.path(),
        &format!("host=127.0.0.1 port={port} user=walsafe"),
    );
    s.connect_timeout = "1s".into();
    let config = s.write(&dir.join("walsafe.toml"));
    let out = Command::new(common::walsafe::bin())
        .args(["--log-format", "json", "--config"])
        .arg(&config)
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logged: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!logged.is_empty(), "no JSON log line in: {stderr}");
    for v in &logged {
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{v}"
        );
    }
    assert!(
        logged.iter().any(|v| v["level"] == "WARN"
            && v["fields"]["message"]
                .as_str()
                .unwrap()
                .contains("cannot connect yet")),
        "{stderr}"
    );
}
