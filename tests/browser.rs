//! The browser side: `/herald.js`, the demo page at `/` and `/favicon.ico`, first as HTTP
//! answers, then in a real browser: Debian's chromium, driven headless by puppeteer-core
//! (tests/browser/demo.test.mjs) against a real herald in Redis mode with history asked for.
//!
//! The script owns the browser; this test owns the processes. When the script needs herald
//! stopped or started again (a restart on the same port, as in a deploy), it prints
//! `@control stop` / `@control start` and waits for `ok` on its stdin.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The whole browser run (about 40 s here) is killed past this.
const BROWSER_TEST_LIMIT: Duration = Duration::from_secs(180);
const CHROMIUM: &str = "/usr/bin/chromium";

// ------------------------------------------------------------------------------ HTTP answers

#[test]
fn herald_js_is_an_es_module_with_cache_headers_and_an_etag() {
    let h = herald().start();
    let r = h.http("GET", "/herald.js", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/javascript; charset=utf-8"));
    assert_eq!(r.header("cache-control"), Some("public, max-age=300"));
    let body = r.text();
    assert!(body.contains("export class Herald"), "not the client module:\n{body}");
    assert!(!body.lines().any(|l| l.starts_with("import ")), "herald.js must not depend on anything");
    assert!(!body.contains("innerHTML"), "herald.js must never build HTML");
    let etag = r.header("etag").expect("an ETag").to_string();
    assert!(etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'), "{etag}");

    let again = h.http("GET", "/herald.js", &[("If-None-Match", &etag)], b"");
    assert_eq!(again.status, 304, "a matching If-None-Match is answered 304");
    assert!(again.body.is_empty());
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    assert_eq!(again.header("cache-control"), Some("public, max-age=300"));
    assert_eq!(again.header("content-length"), None, "a 304 must not announce a length of 0");

    let stale = h.http("GET", "/herald.js", &[("If-None-Match", "\"something-else\"")], b"");
    assert_eq!(stale.status, 200);
    assert_eq!(stale.text(), body);

    assert_eq!(h.http("POST", "/herald.js", &[], b"").status, 405);
}

#[test]
fn the_demo_page_has_a_viewport_a_csp_and_a_favicon() {
    let h = herald().start();
    let r = h.http("GET", "/", &[], b"");
    assert_eq!(r.status, 200);
    let body = r.text();
    assert!(body.contains("<meta name=\"viewport\""), "no viewport meta");
    assert!(body.contains("from \"/herald.js\""), "the page is built on /herald.js");
    assert!(!body.contains("innerHTML"), "the page must never build HTML from strings");
    let csp = r.header("content-security-policy").expect("a CSP on /");
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");

    let icon = h.http("GET", "/favicon.ico", &[], b"");
    assert_eq!(icon.status, 200, "a missing favicon is a console error on every load");
    assert_eq!(icon.header("content-type"), Some("image/svg+xml"));
    assert!(icon.text().starts_with("<svg"));
}

// ------------------------------------------------------------------------------ the browser

/// What is missing to run the browser test, if anything.
fn browser_prerequisites(dir: &Path) -> Option<String> {
    if !Path::new(CHROMIUM).exists() {
        return Some(format!("{CHROMIUM} is missing (apt-get install chromium)"));
    }
    if Command::new("node").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        return Some("node is missing (apt-get install nodejs)".into());
    }
    if !dir.join("node_modules/puppeteer-core").exists() {
        return Some(format!("puppeteer-core is not installed (cd {} && npm ci)", dir.display()));
    }
    None
}

fn start_herald(redis: &Redis, port: Option<u16>) -> Herald {
    let mut builder = herald()
        .redis(redis)
        .api_key()
        // Resume across the restart needs the history of issue #12; without it the
        // script skips that check.
        .env("HERALD_HISTORY_SIZE", "100")
        .env("HERALD_SHUTDOWN_GRACE", "5s");
    if let Some(port) = port {
        builder = builder.port(port);
    }
    builder.start()
}

#[test]
fn the_demo_page_and_herald_js_work_in_chromium() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if let Some(missing) = browser_prerequisites(&dir) {
        panic!("the browser test cannot run: {missing}. `bash .ci/test` installs all of it.");
    }
    let redis = Redis::start();
    let mut herald = Some(start_herald(&redis, None));
    let port = herald.as_ref().map(|h| h.port).unwrap_or_default();

    let mut child = Command::new("node")
        .arg("demo.test.mjs")
        .current_dir(&dir)
        .env("HERALD_PORT", port.to_string())
        .env("REDIS_PORT", redis.port.to_string())
        .env("HERALD_TEST_SECRET", SECRET)
        .env("HERALD_TEST_API_KEY", API_KEY)
        .env("CHROMIUM", CHROMIUM)
        // Its own process group, so that the browser it starts dies with it on a timeout.
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let group = child.id() as i32;
    let mut replies = child.stdin.take().expect("node's stdin");
    let (lines, from_node) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("node's stdout");
    let stderr = child.stderr.take().expect("node's stderr");
    let out = lines.clone();
    thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).for_each(|l| drop(out.send(l))));
    thread::spawn(move || {
        BufReader::new(stderr).lines().map_while(Result::ok).for_each(|l| drop(lines.send(format!("stderr: {l}"))))
    });

    let deadline = Instant::now() + BROWSER_TEST_LIMIT;
    let mut transcript = String::new();
    let status = loop {
        match from_node.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(command) = line.strip_prefix("@control ") {
                    let reply = match command.trim() {
                        "stop" => match herald.take() {
                            Some(mut h) => {
                                h.sigterm();
                                match h.wait_exit(Duration::from_secs(10)) {
                                    Some(_) => "ok".to_string(),
                                    None => "error: herald did not exit within 10 s of SIGTERM".to_string(),
                                }
                            }
                            None => "error: herald is not running".to_string(),
                        },
                        "start" => {
                            herald = Some(start_herald(&redis, Some(port)));
                            "ok".to_string()
                        }
                        other => format!("error: unknown command {other:?}"),
                    };
                    transcript.push_str(&format!("{line} -> {reply}\n"));
                    let _ = writeln!(replies, "{reply}");
                } else {
                    println!("{line}");
                    transcript.push_str(&line);
                    transcript.push('\n');
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            // The last lines may still be in the channel.
            thread::sleep(Duration::from_millis(100));
            while let Ok(line) = from_node.try_recv() {
                println!("{line}");
                transcript.push_str(&line);
                transcript.push('\n');
            }
            break Some(status);
        }
        if Instant::now() >= deadline {
            // SAFETY: kill(2) on the process group this test created for node; no memory is
            // involved.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
    };
    // The browser may outlive a node that crashed: its group goes with it.
    // SAFETY: as above; an already empty group gives ESRCH, which is fine.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    let Some(status) = status else {
        panic!("the browser test did not finish within {BROWSER_TEST_LIMIT:?}:\n{transcript}");
    };
    assert!(status.success(), "the browser test failed ({status}):\n{transcript}");
    assert!(
        transcript.lines().any(|l| l.starts_with("browser: ") && l.contains(" passed, 0 failed")),
        "the browser test printed no summary:\n{transcript}"
    );
}
