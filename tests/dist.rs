//! The systemd unit in `dist/`: systemd accepts it, and the command lines
//! it runs are ones this `upgate` understands.

mod support;

use std::path::Path;
use std::process::Command;

fn unit() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/upgate.service"))
        .expect("dist/upgate.service")
}

/// The unit's `Key=` values (a key may repeat).
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn the_units_commands_are_ones_upgate_runs() {
    let unit = unit();
    let dir = support::TempDir::new("dist");
    let cfg = dir.0.join("routes.yaml");
    std::fs::write(
        &cfg,
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: { backends: [ws://127.0.0.1:1] }\nroutes:\n  - { name: r, pool: p }\n",
    )
    .unwrap();
    let run = |cmdline: &str, extra: &[&str]| {
        let mut words = cmdline.split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/bin/upgate"), "{cmdline}");
        let args: Vec<String> = words
            .map(|w| w.replace("/etc/upgate/routes.yaml", &cfg.display().to_string()))
            .collect();
        let out = Command::new(env!("CARGO_BIN_EXE_upgate"))
            .args(&args)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmdline}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for pre in values(&unit, "ExecStartPre") {
        run(pre, &[]);
    }
    // The start line's options, with `check` instead of serving.
    let start = values(&unit, "ExecStart");
    assert_eq!(start.len(), 1);
    run(start[0], &["check"]);
    let reload = values(&unit, "ExecReload");
    assert_eq!(reload.len(), 2, "check, then SIGHUP");
    run(reload[0], &[]);
    assert_eq!(reload[1], "/bin/kill -HUP $MAINPID");
    // Stopping waits longer than the default shutdown_grace (30 s).
    let stop: u64 = values(&unit, "TimeoutStopSec")[0].parse().unwrap();
    assert!(stop > 30);
}

#[test]
fn systemd_accepts_the_unit() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        assert!(
            std::env::var_os("UPGATE_REQUIRE_SYSTEMD").is_none(),
            "UPGATE_REQUIRE_SYSTEMD is set but there is no systemd-analyze"
        );
        eprintln!("SKIPPED: no systemd-analyze on this machine");
        return;
    };
    assert!(probe.status.success());
    // The binary the unit names, at a path that exists here.
    let dir = support::TempDir::new("dist-verify");
    let unit = unit()
        .replace("/usr/local/bin/upgate", env!("CARGO_BIN_EXE_upgate"))
        .replace("/etc/upgate", &dir.0.display().to_string());
    let path = dir.0.join("upgate.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Only lines about our unit count (the host's own units may be odd).
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("upgate.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{said}");
}
