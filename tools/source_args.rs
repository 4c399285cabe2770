//! What the CLIs that stream shards share: the source flags (`--allow-pipe`, the
//! http(s) retries and timeouts) and the report of what the loader skipped. Included
//! by each binary (`#[path]`), so every command spells and reports them the same way.

use anyhow::{Result, bail};
use clap::Args;
use conmim::loader::FailedItem;
use conmim::stream::{
    DEFAULT_BACKOFF, DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, DEFAULT_RETRIES, HttpOptions,
    SourceOptions,
};

#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// Accept pipe:CMD shard URLs (they run shell commands).
    #[arg(long)]
    pub allow_pipe: bool,
    /// http(s) shards and manifests: retries after a failed attempt (connection error,
    /// timeout, 5xx, 408, 429), with exponential backoff from 0.2 s; also the resumes
    /// (range requests) of a shard whose connection fails in the middle.
    #[arg(long, default_value_t = DEFAULT_RETRIES, value_name = "N")]
    pub http_retries: u32,
    /// http(s): seconds a server may send nothing before the attempt fails (before the
    /// body: retried; in the middle of a shard: resumed from there, within
    /// --http-retries, else the shard is reported as damaged).
    #[arg(long, default_value_t = DEFAULT_READ_TIMEOUT.as_secs_f64(), value_name = "S")]
    pub http_timeout: f64,
    /// http(s): seconds allowed to connect (TLS included).
    #[arg(long, default_value_t = DEFAULT_CONNECT_TIMEOUT.as_secs_f64(), value_name = "S")]
    pub http_connect_timeout: f64,
}

impl SourceArgs {
    /// The http settings, checked.
    pub fn http(&self) -> Result<HttpOptions> {
        let ms = |flag: &str, s: f64| -> Result<u64> {
            if !(s.is_finite() && s > 0.0) {
                bail!("--{flag} must be a positive number of seconds (got {s})");
            }
            Ok((s * 1e3).ceil() as u64)
        };
        Ok(HttpOptions {
            retries: self.http_retries,
            backoff_ms: DEFAULT_BACKOFF.as_millis() as u64,
            connect_timeout_ms: ms("http-connect-timeout", self.http_connect_timeout)?,
            read_timeout_ms: ms("http-timeout", self.http_timeout)?,
        })
    }

    /// The source options for `split`.
    pub fn options(&self, split: &str) -> Result<SourceOptions> {
        Ok(SourceOptions {
            split: split.to_owned(),
            allow_pipe: self.allow_pipe,
            http: self.http()?,
        })
    }
}

/// Prints, on stderr, how many corrupt samples and failed shards the loader skipped and
/// the first few of them (shard, key, message); nothing when there were none.
#[allow(dead_code)] // `conmim` reports with it only when built with `train`
pub fn print_skipped(prefix: &str, samples: u64, shards: u64, first: &[FailedItem]) {
    if samples + shards == 0 {
        return;
    }
    eprintln!(
        "{prefix}skipped {samples} corrupt samples and {shards} damaged/unreachable shards; \
         the first:"
    );
    for e in first.iter().take(10) {
        let key = if e.key.is_empty() { "(shard)" } else { &e.key };
        eprintln!("  {} {key}: {}", e.shard, e.message);
    }
}
