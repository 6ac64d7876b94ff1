//! `gateway healthcheck`: is the gateway on this host alive? GET `/healthz`
//! over HTTP or HTTPS as the configuration says (the image's `HEALTHCHECK`
//! and systemd checks use it; no curl needed). Prints one line and exits 0
//! (healthy) or 1 (not).

use std::path::Path;
use std::process::ExitCode;

use crate::cli::HealthcheckArgs;
use crate::config::Settings;

/// The URL checked by default.
pub fn default_url(settings: &Settings) -> Result<String, String> {
    let addr = settings.http.addr;
    if addr.port() == 0 {
        return Err("http.addr has port 0 (a free port picked at start): give --url".into());
    }
    Ok(format!(
        "{}/healthz",
        crate::ops_cli::local_admin_url(settings)
    ))
}

fn read(what: &str, p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read {what} {}: {e}", p.display()))
}

fn check(settings: &Settings, args: &HealthcheckArgs) -> Result<String, String> {
    let url = match &args.url {
        Some(u) => u.clone(),
        None => default_url(settings)?,
    };
    let mut b = reqwest::blocking::Client::builder()
        .timeout(args.timeout)
        .connect_timeout(args.timeout);
    let ca = args.ca_file.clone().or_else(|| {
        settings
            .http
            .tls
            .as_ref()
            .and_then(|t| t.client_ca_file.clone())
    });
    if let (Some(ca), true) = (ca, url.starts_with("https:")) {
        let pem = read("CA file", &ca)?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| format!("{}: not a PEM certificate: {e}", ca.display()))?;
        b = b.add_root_certificate(cert);
    }
    if let (Some(c), Some(k)) = (&args.cert_file, &args.key_file) {
        let id = reqwest::Identity::from_pkcs8_pem(&read("certificate", c)?, &read("key", k)?)
            .map_err(|e| format!("client certificate {}: {e}", c.display()))?;
        b = b.identity(id);
    }
    let client = b.build().map_err(|e| format!("{url}: {e}"))?;
    match client.get(&url).send() {
        Ok(r) if r.status().is_success() => {
            Ok(format!("healthy: GET {url} -> {}", r.status().as_u16()))
        }
        Ok(r) => Err(format!("unhealthy: GET {url} -> {}", r.status().as_u16())),
        Err(e) => {
            // The chain of causes, on one line.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            Err(format!("unhealthy: GET {url}: {msg}"))
        }
    }
}

/// Runs the check; prints one line.
pub fn run(settings: &Settings, args: &HealthcheckArgs) -> ExitCode {
    match check(settings, args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(line) => {
            println!("{line}");
            ExitCode::FAILURE
        }
    }
}
