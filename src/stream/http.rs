//! `http://` / `https://` shards: a streaming GET with retries.
//!
//! The body is read straight off the connection (never buffered whole). Opening
//! retries with exponential backoff on connection-level failures (refused, reset,
//! DNS, timeouts, protocol errors) and on `5xx`, `408` and `429` statuses; any other
//! non-success status (`404`, `403`, ...) fails at once. Every error names the URL.
//! A failure in the middle of the body (a reset or closed connection, a read timeout)
//! is resumed where it stopped: a new GET with `Range: bytes=N-` (a `206` continues
//! the bytes; a server that ignores ranges answers `200`, and the first `N` bytes are
//! read and dropped), with the same backoff and up to `retries` resumes per shard.
//! The shard reader sees one uninterrupted byte stream. Past the retries, the read
//! error surfaces, and the shard reader reports a damaged shard (its samples so far
//! are kept; the stream goes on).

use std::io::{self, BufReader, Read};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::url::{Opener, READ_BUFFER};
use crate::error::{Error, Result};

/// Default number of retries after the first attempt.
pub const DEFAULT_RETRIES: u32 = 3;
/// Default wait before the first retry (doubled for each further retry).
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(200);
/// Default limit for establishing a connection (TLS handshake included).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit for each read from the connection (an idle timeout).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The http(s) client settings of a source ([`super::SourceOptions::http`]); the
/// defaults are the `DEFAULT_*` constants above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpOptions {
    /// Retries after the first attempt on retryable failures (connection errors,
    /// timeouts, `5xx`, `408`, `429`), and resumes of each shard's body.
    pub retries: u32,
    /// Wait before the first retry, in milliseconds; doubled for each further retry.
    pub backoff_ms: u64,
    /// Limit for establishing a connection (TLS included), in milliseconds.
    pub connect_timeout_ms: u64,
    /// Limit for each read (headers and body), in milliseconds: a server that sends
    /// nothing for this long is a failed attempt (before the body) or a resume (in the
    /// middle of it; a damaged shard once `retries` resumes are spent).
    pub read_timeout_ms: u64,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            retries: DEFAULT_RETRIES,
            backoff_ms: DEFAULT_BACKOFF.as_millis() as u64,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT.as_millis() as u64,
            read_timeout_ms: DEFAULT_READ_TIMEOUT.as_millis() as u64,
        }
    }
}

impl HttpOptions {
    /// Timeouts must be positive (a zero timeout would fail every request).
    pub fn validate(&self) -> Result<()> {
        if self.connect_timeout_ms == 0 || self.read_timeout_ms == 0 {
            return Err(Error::Config(format!(
                "http timeouts must be positive (connect {} ms, read {} ms)",
                self.connect_timeout_ms, self.read_timeout_ms
            )));
        }
        Ok(())
    }
}

/// Opens http(s) URLs as streaming GET bodies. The agent (connection pool) is shared
/// by clones. `connect_timeout` / `read_timeout` are baked into `agent` by
/// [`HttpOpener::with_timeouts`]; change them through it, not by assigning the fields.
#[derive(Debug, Clone)]
pub struct HttpOpener {
    /// The HTTP client (status codes are not turned into errors by it).
    pub agent: ureq::Agent,
    /// Retries after the first attempt on retryable failures.
    pub retries: u32,
    /// Wait before the first retry; doubled for each further retry.
    pub backoff: Duration,
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// Limit for each read (headers and body): an idle timeout, not a total one.
    pub read_timeout: Duration,
}

impl Default for HttpOpener {
    fn default() -> Self {
        HttpOpener::with_timeouts(DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT)
    }
}

impl HttpOpener {
    /// An opener with the default retries and backoff and the given timeouts.
    pub fn with_timeouts(connect_timeout: Duration, read_timeout: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(connect_timeout))
            .timeout_per_read(Some(read_timeout))
            .build();
        HttpOpener {
            agent: ureq::Agent::new_with_config(config),
            retries: DEFAULT_RETRIES,
            backoff: DEFAULT_BACKOFF,
            connect_timeout,
            read_timeout,
        }
    }

    /// An opener with these settings.
    pub fn from_options(o: &HttpOptions) -> Self {
        HttpOpener {
            retries: o.retries,
            backoff: Duration::from_millis(o.backoff_ms),
            ..HttpOpener::with_timeouts(
                Duration::from_millis(o.connect_timeout_ms),
                Duration::from_millis(o.read_timeout_ms),
            )
        }
    }

    /// Wait before retry number `retry` (0-based): `backoff * 2^retry`.
    fn delay(&self, retry: u32) -> Duration {
        self.backoff
            .saturating_mul(2u32.saturating_pow(retry.min(30)))
    }

    /// One attempt: the body reader, or the error and whether it is worth retrying.
    fn attempt(&self, url: &str) -> std::result::Result<Box<dyn Read + Send>, (io::Error, bool)> {
        let body = self.attempt_from(url, 0)?;
        let body = BodyReader {
            inner: body,
            url: url.to_owned(),
            opener: self.clone(),
            pos: 0,
            resumes: 0,
        };
        Ok(Box::new(BufReader::with_capacity(READ_BUFFER, body)))
    }

    /// One GET of `url`'s body from byte `from` on (a `Range` request when `from > 0`),
    /// or the error and whether it is worth retrying.
    fn attempt_from(
        &self,
        url: &str,
        from: u64,
    ) -> std::result::Result<ureq::BodyReader<'static>, (io::Error, bool)> {
        let mut req = self.agent.get(url);
        if from > 0 {
            req = req.header("Range", format!("bytes={from}-"));
        }
        match req.call() {
            Ok(resp) => {
                let status = resp.status();
                if from > 0 && status.as_u16() == 206 {
                    let start = resp
                        .headers()
                        .get("content-range")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes "))
                        .and_then(|v| v.split('-').next())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    if start != Some(from) {
                        let msg = format!("resumed at byte {from}, but the server sent {start:?}");
                        return Err((io::Error::other(msg), false));
                    }
                    return Ok(resp.into_body().into_reader());
                }
                if status.is_success() {
                    let mut body = resp.into_body().into_reader();
                    if from > 0 {
                        // The server ignores ranges: skip what was read already.
                        let skipped = io::copy(&mut (&mut body).take(from), &mut io::sink())
                            .map_err(|e| (e, true))?;
                        if skipped < from {
                            let msg = format!("the body shrank to {skipped} bytes on resume");
                            return Err((io::Error::other(msg), false));
                        }
                    }
                    return Ok(body);
                }
                let code = status.as_u16();
                let retry = status.is_server_error() || code == 429 || code == 408;
                let kind = match code {
                    404 | 410 => io::ErrorKind::NotFound,
                    401 | 403 => io::ErrorKind::PermissionDenied,
                    _ => io::ErrorKind::Other,
                };
                Err((io::Error::new(kind, format!("HTTP status {status}")), retry))
            }
            Err(e) => {
                let retry = matches!(
                    e,
                    ureq::Error::Io(_)
                        | ureq::Error::Timeout(_)
                        | ureq::Error::ConnectionFailed
                        | ureq::Error::HostNotFound
                        | ureq::Error::Protocol(_)
                        | ureq::Error::BodyStalled
                );
                Err((io::Error::other(format!("HTTP request failed: {e}")), retry))
            }
        }
    }
}

impl Opener for HttpOpener {
    /// Every attempt waiting out its connect and read timeouts, plus the backoffs
    /// between them: `(retries + 1) x (connect + read) + backoff x (2^retries - 1)`
    /// (defaults: 4 x 70 s + 1.4 s). A body read resumes within the same bound.
    fn retry_budget(&self, _url: &str) -> Duration {
        let attempts = self.retries.saturating_add(1);
        let waits = (0..self.retries).fold(Duration::ZERO, |t, r| t.saturating_add(self.delay(r)));
        (self.connect_timeout.saturating_add(self.read_timeout))
            .saturating_mul(attempts)
            .saturating_add(waits)
    }

    fn open(&self, url: &str) -> Result<Box<dyn Read + Send>> {
        let mut retry = 0;
        loop {
            match self.attempt(url) {
                Ok(r) => return Ok(r),
                Err((_, true)) if retry < self.retries => {
                    std::thread::sleep(self.delay(retry));
                    retry += 1;
                }
                Err((e, retryable)) => {
                    let e = if retryable && retry > 0 {
                        io::Error::new(e.kind(), format!("{e} (after {retry} retries)"))
                    } else {
                        e
                    };
                    return Err(Error::io(PathBuf::from(url), e));
                }
            }
        }
    }
}

/// The response body, resumed with range requests after a failure in the middle (see
/// the module docs); read errors name the URL.
struct BodyReader {
    inner: ureq::BodyReader<'static>,
    url: String,
    opener: HttpOpener,
    /// Bytes delivered so far.
    pos: u64,
    /// Resumes used (at most `opener.retries`).
    resumes: u32,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let err = match self.inner.read(buf) {
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e,
            };
            // Resume from `pos`, retrying the resume itself within the same budget.
            let mut last = err;
            loop {
                if self.resumes >= self.opener.retries {
                    let note = if self.resumes > 0 {
                        format!(" (after {} resumes)", self.resumes)
                    } else {
                        String::new()
                    };
                    return Err(io::Error::new(
                        last.kind(),
                        format!("{}: at byte {}: {last}{note}", self.url, self.pos),
                    ));
                }
                std::thread::sleep(self.opener.delay(self.resumes));
                self.resumes += 1;
                match self.opener.attempt_from(&self.url, self.pos) {
                    Ok(body) => {
                        self.inner = body;
                        break;
                    }
                    Err((e, true)) => last = e,
                    Err((e, false)) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("{}: resuming at byte {}: {e}", self.url, self.pos),
                        ));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stall watchdog's floor for http shards: every attempt timing out, plus the
    /// backoffs (defaults: 4 x (10 + 60) s + 0.2 + 0.4 + 0.8 s); local files: none.
    #[test]
    fn retry_budget_covers_every_attempt() {
        let o = HttpOpener::default();
        assert_eq!(
            o.retry_budget("https://h/a.tar"),
            Duration::from_millis(281_400)
        );
        let more = HttpOpener {
            retries: 5,
            ..HttpOpener::default()
        };
        assert_eq!(
            more.retry_budget("https://h/a.tar"),
            Duration::from_millis(6 * 70_000 + 200 * 31)
        );
        let d = crate::stream::DefaultOpener::new(false);
        assert_eq!(d.retry_budget("/data/a.tar"), Duration::ZERO);
        assert_eq!(d.retry_budget("http://h/a.tar"), o.retry_budget("x"));
    }

    #[test]
    fn backoff_doubles() {
        let o = HttpOpener {
            backoff: Duration::from_millis(5),
            ..HttpOpener::default()
        };
        assert_eq!(o.delay(0), Duration::from_millis(5));
        assert_eq!(o.delay(2), Duration::from_millis(20));
        assert_eq!(o.retries, DEFAULT_RETRIES);
    }

    #[test]
    fn options_default_to_the_constants_and_validate() {
        let o = HttpOpener::from_options(&HttpOptions::default());
        assert_eq!(
            (o.retries, o.backoff, o.connect_timeout, o.read_timeout),
            (
                DEFAULT_RETRIES,
                DEFAULT_BACKOFF,
                DEFAULT_CONNECT_TIMEOUT,
                DEFAULT_READ_TIMEOUT
            )
        );
        assert!(HttpOptions::default().validate().is_ok());
        let zero = HttpOptions {
            read_timeout_ms: 0,
            ..HttpOptions::default()
        };
        assert!(zero.validate().is_err());
        let o: HttpOptions = serde_json::from_str(r#"{"retries": 7}"#).unwrap();
        assert_eq!((o.retries, o.read_timeout_ms), (7, 60_000));
        assert!(serde_json::from_str::<HttpOptions>(r#"{"retry": 7}"#).is_err());
    }
}
