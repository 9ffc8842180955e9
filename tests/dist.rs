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
        assert_eq!(words.next(), Some("/usr/bin/upgate"), "{cmdline}");
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
#[cfg_attr(
    no_systemd_analyze,
    ignore = "needs systemd-analyze (apt-get install systemd)"
)]
fn systemd_accepts_the_unit() {
    // The binary the unit names, at a path that exists here.
    let dir = support::TempDir::new("dist-verify");
    let unit = unit()
        .replace("/usr/bin/upgate", env!("CARGO_BIN_EXE_upgate"))
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

/// `cargo deb` packages this build (the test's own binary: `--profile dev
/// --no-build`) with the unit, the user and a starter config; the binary
/// unpacked from the package accepts the config the package ships.
#[test]
#[cfg_attr(no_cargo_deb, ignore = "needs cargo-deb (cargo install cargo-deb)")]
fn the_debian_package_holds_binary_unit_and_a_config_it_accepts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = Path::new(env!("CARGO_BIN_EXE_upgate"));
    let target = exe
        .parent()
        .and_then(Path::parent)
        .expect("the binary sits in <target>/debug");
    let dir = support::TempDir::new("deb");
    let out = Command::new("cargo")
        .args([
            "deb",
            "--locked",
            "--profile",
            "dev",
            "--no-build",
            "--no-strip",
        ])
        .args(["--fast", "--quiet", "--output"])
        .arg(&dir.0)
        .env("CARGO_TARGET_DIR", target)
        .current_dir(root)
        .output()
        .expect("cargo deb ran");
    assert!(
        out.status.success(),
        "cargo deb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb in the output directory");
    let dpkg = |args: &[&str]| {
        let out = Command::new("dpkg-deb")
            .args(args)
            .arg(&deb)
            .output()
            .expect("dpkg-deb ran");
        assert!(out.status.success(), "dpkg-deb {args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let files = dpkg(&["--contents"]);
    for want in [
        "./usr/bin/upgate",
        "./usr/lib/systemd/system/upgate.service",
        "./etc/upgate/routes.yaml",
        "./usr/share/doc/upgate/configuration.md",
    ] {
        assert!(
            files.lines().any(|l| l.ends_with(want)),
            "{want} not in:\n{files}"
        );
    }
    assert!(dpkg(&["--field"]).contains("adduser"), "depends on adduser");
    let ctl = dir.0.join("control");
    let out = Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(&ctl)
        .status()
        .unwrap();
    assert!(out.success());
    let conffiles = std::fs::read_to_string(ctl.join("conffiles")).unwrap();
    assert!(
        conffiles.lines().any(|l| l == "/etc/upgate/routes.yaml"),
        "an edited config survives upgrades: {conffiles}"
    );
    let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system"), "{postinst}");
    // Unpacked as dpkg would install it; the packaged unit is the repo's.
    let fs = dir.0.join("root");
    let unpacked = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&fs)
        .status()
        .unwrap();
    assert!(unpacked.success());
    let packaged =
        std::fs::read_to_string(fs.join("usr/lib/systemd/system/upgate.service")).unwrap();
    assert_eq!(packaged, unit());
    assert!(values(&packaged, "ExecStart")[0].starts_with("/usr/bin/upgate "));
    let check = Command::new(fs.join("usr/bin/upgate"))
        .arg("check")
        .arg(fs.join("etc/upgate/routes.yaml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the shipped config: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}
