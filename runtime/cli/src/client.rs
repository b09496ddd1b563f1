//! The HTTP client side of the CLI: deploy, list, delete, invoke, models.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, bail};

use crate::Remote;

fn request(remote: &Remote, method: &str, path: &str) -> ureq::Request {
    let req = ureq::request(method, &format!("{}{path}", remote.url.trim_end_matches('/')));
    match &remote.token {
        Some(t) => req.set("authorization", &format!("Bearer {t}")),
        None => req,
    }
}

/// Turns an HTTP error status into an error carrying the server's message.
fn check(result: Result<ureq::Response, ureq::Error>) -> anyhow::Result<ureq::Response> {
    match result {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(code, r)) => {
            let body = r.into_string().unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(body);
            bail!("server answered {code}: {}", message.trim())
        }
        Err(e) => Err(e).context("could not reach the kindling server (is `kindling serve` running? see --url)"),
    }
}

pub fn print_json(remote: &Remote, method: &str, path: &str, body: Option<serde_json::Value>) -> anyhow::Result<()> {
    let req = request(remote, method, path);
    let resp = check(match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    })?;
    println!("{}", resp.into_string()?.trim_end());
    Ok(())
}

/// Admits a model to the server's pool, drawing its progress as a bar on stderr.
pub fn preload(remote: &Remote, name: &str) -> anyhow::Result<()> {
    let resp = check(request(remote, "POST", &format!("/admin/models/{name}/preload")).call())?;
    let mut stderr = std::io::stderr();
    for line in std::io::BufRead::lines(std::io::BufReader::new(resp.into_reader())) {
        let event: serde_json::Value = serde_json::from_str(&line?)?;
        if let Some(err) = event["error"].as_str() {
            writeln!(stderr)?;
            bail!("preload failed: {err}");
        }
        if event["done"].as_bool() == Some(true) {
            let how = if event["already_pooled"].as_bool() == Some(true) { "already pooled" } else { "pooled" };
            writeln!(stderr, "\n{name}: {how} in {:.2} s", event["seconds"].as_f64().unwrap_or(0.0))?;
            return Ok(());
        }
        let (done, total) = (event["resident_bytes"].as_u64().unwrap_or(0), event["total_bytes"].as_u64().unwrap_or(1));
        write!(stderr, "\r{}", progress_bar(done, total))?;
        stderr.flush()?;
    }
    bail!("the server ended the preload without finishing it")
}

/// `[##########          ]  50%  8.0/16.0 GB`
fn progress_bar(done: u64, total: u64) -> String {
    const WIDTH: usize = 30;
    let fraction = if total == 0 { 1.0 } else { (done as f64 / total as f64).min(1.0) };
    let filled = (fraction * WIDTH as f64).round() as usize;
    format!(
        "[{}{}] {:>3.0}%  {:.1}/{:.1} GB",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled),
        fraction * 100.0,
        done as f64 / 1e9,
        total as f64 / 1e9
    )
}

pub fn delete(remote: &Remote, name: &str) -> anyhow::Result<()> {
    check(request(remote, "DELETE", &format!("/admin/deployments/{name}")).call())?;
    println!("deleted {name}");
    Ok(())
}

pub fn deploy(remote: &Remote, manifest: &Path, component: &Path) -> anyhow::Result<()> {
    let manifest_text = std::fs::read(manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let wasm = read_component(component)?;
    eprintln!("deploying {} ({} bytes) ...", component.display(), wasm.len());
    println!("{}", deploy_bytes(remote, &manifest_text, &wasm)?.trim_end());
    Ok(())
}

/// A component's bytes: a `.wasm` as it is, a `.wat` (component text format) assembled here.
pub fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "wat") {
        return wat::parse_file(path).with_context(|| format!("assembling {}", path.display()));
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Deploys a manifest and component as multipart form data; returns the server's answer.
pub fn deploy_bytes(remote: &Remote, manifest: &[u8], wasm: &[u8]) -> anyhow::Result<String> {
    let boundary = format!("kindling-{:016x}", rand::random::<u64>());
    let mut body = Vec::with_capacity(wasm.len() + manifest.len() + 512);
    for (name, filename, content_type, bytes) in [
        ("manifest", "kindling.toml", "application/toml", manifest),
        ("component", "handler.wasm", "application/wasm", wasm),
    ] {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
        )?;
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n")?;
    let resp = check(
        request(remote, "POST", "/admin/deployments")
            .set("content-type", &format!("multipart/form-data; boundary={boundary}"))
            .send_bytes(&body),
    )?;
    Ok(resp.into_string()?)
}

pub fn invoke(remote: &Remote, path: &str, data: Option<String>, include: bool) -> anyhow::Result<()> {
    let result = match data {
        Some(d) => request(remote, "POST", path).set("content-type", "application/json").send_string(&d),
        None => request(remote, "GET", path).call(),
    };
    let (resp, failed) = match result {
        Ok(r) => (r, false),
        Err(ureq::Error::Status(_, r)) => (r, true),
        Err(e) => return Err(e).context("could not reach the kindling server"),
    };
    if include || failed {
        eprintln!("HTTP {} {}", resp.status(), resp.status_text());
        for name in resp.headers_names() {
            eprintln!("{name}: {}", resp.header(&name).unwrap_or_default());
        }
    }
    let status = resp.status();
    // Copy as it arrives, so streamed tokens show up as they are generated.
    let mut reader = resp.into_reader();
    let mut stdout = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    if failed {
        bail!("request failed with status {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::progress_bar;

    #[test]
    fn progress_bar_fills_in_proportion() {
        assert_eq!(progress_bar(0, 100), format!("[{}]   0%  0.0/0.0 GB", " ".repeat(30)));
        assert!(progress_bar(8_000_000_000, 16_000_000_000).starts_with(&format!(
            "[{}{}]  50%  8.0/16.0 GB",
            "#".repeat(15),
            " ".repeat(15)
        )));
        assert!(progress_bar(5, 0).contains("100%"));
    }
}
