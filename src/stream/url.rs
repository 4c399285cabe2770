//! Data sources: resolving a source spec into an ordered shard list, and opening a
//! shard URL as a byte stream.
//!
//! URL forms: a local path (or `file://path`); `pipe:CMD` (the standard output of
//! `sh -c CMD`, only when explicitly allowed, because a shard list must not be able to
//! run commands by default); `http://` / `https://` (a streaming GET with retries, see
//! [`HttpOpener`]).

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use serde::{Deserialize, Serialize};

use super::http::{HttpOpener, HttpOptions};
use crate::error::{Error, Result};
use crate::format::manifest::Manifest;

/// Prefix of command URLs.
pub const PIPE_PREFIX: &str = "pipe:";
/// Default split looked for in a dataset directory.
pub const DEFAULT_SPLIT: &str = "train";
/// Read buffer for files and pipes.
pub const READ_BUFFER: usize = 1 << 20;

/// One shard of a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    /// Where to read it.
    pub url: String,
    /// Samples in it, when known (from a manifest).
    pub nsamples: Option<u64>,
}

/// How a source spec is resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceOptions {
    /// Split whose manifest a dataset directory is read for.
    pub split: String,
    /// Accept `pipe:` URLs (they run shell commands).
    pub allow_pipe: bool,
    /// Retries and timeouts of `http(s)://` shards and manifests.
    pub http: HttpOptions,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            split: DEFAULT_SPLIT.to_owned(),
            allow_pipe: false,
            http: HttpOptions::default(),
        }
    }
}

/// An ordered list of shards. The order is the list's identity: plans and stream
/// states refer to positions in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardList {
    shards: Vec<ShardSpec>,
}

fn is_url(s: &str) -> bool {
    s.starts_with(PIPE_PREFIX) || s.contains("://")
}

fn refuse_pipes(shards: &[ShardSpec], allow_pipe: bool) -> Result<()> {
    match shards.iter().find(|s| s.url.starts_with(PIPE_PREFIX)) {
        Some(s) if !allow_pipe => Err(Error::Config(format!(
            "shard `{}` is a command; pipe: sources run shell commands and must be \
             allowed explicitly (allow_pipe)",
            s.url
        ))),
        _ => Ok(()),
    }
}

/// Largest manifest read over http (a manifest of a million shards is ~100 MB).
const MAX_REMOTE_MANIFEST: u64 = 1 << 30;

/// `manifest` (a URL) without its query string or fragment.
fn url_path_part(manifest: &str) -> &str {
    manifest.split(['?', '#']).next().unwrap_or(manifest)
}

/// `entry` of a manifest at URL `manifest` (`https://host/dir/x.manifest.json`, a
/// query string allowed): an http(s) URL as is, an absolute path on the manifest's
/// server (`/data/a.tar` -> `https://host/data/a.tar`), a relative path joined to the
/// manifest's URL directory (`https://host/dir/entry`). A manifest fetched over http
/// is not trusted to name local files or commands: any other scheme (`file://`,
/// `pipe:`, ...) is an error naming the entry.
fn join_url(manifest: &str, entry: &str) -> Result<String> {
    if entry.starts_with("http://") || entry.starts_with("https://") {
        return Ok(entry.to_owned());
    }
    if is_url(entry) {
        return Err(Error::Config(format!(
            "the manifest {manifest} names the shard `{entry}`: a manifest fetched over \
             http(s) may only name shards over http(s) (not local files or commands)"
        )));
    }
    let base = url_path_part(manifest);
    if let Some(path) = entry.strip_prefix('/') {
        // scheme://host[:port] of the manifest.
        let after = base.find("://").map_or(0, |i| i + 3);
        let origin = base[after..].find('/').map_or(base, |i| &base[..after + i]);
        return Ok(format!("{origin}/{path}"));
    }
    let dir = base.rsplit_once('/').map_or(base, |(d, _)| d);
    Ok(format!("{dir}/{}", entry.trim_start_matches("./")))
}

/// `entry` made relative to `dir` unless it is a URL or an absolute path.
fn join(dir: &Path, entry: &str) -> String {
    if is_url(entry) || Path::new(entry).is_absolute() {
        entry.to_owned()
    } else {
        dir.join(entry).to_string_lossy().into_owned()
    }
}

impl ShardList {
    /// A list from explicit specs (no checks).
    pub fn from_specs(shards: Vec<ShardSpec>) -> Self {
        ShardList { shards }
    }

    /// A list of URLs with unknown sample counts; `pipe:` refused unless allowed.
    pub fn from_urls(urls: Vec<String>, allow_pipe: bool) -> Result<Self> {
        let shards: Vec<ShardSpec> = urls
            .into_iter()
            .map(|url| ShardSpec {
                url,
                nsamples: None,
            })
            .collect();
        refuse_pipes(&shards, allow_pipe)?;
        Ok(ShardList { shards })
    }

    /// Resolves a source spec, tried in this order:
    /// 1. `pipe:CMD` — one command shard (refused unless `allow_pipe`);
    /// 2. something with `://` — a URL, brace-expanded; except an `http(s)://` URL
    ///    ending in `.manifest.json`, a remote manifest (its relative shard names
    ///    joined to the manifest's URL directory, sample counts included), or ending
    ///    in `/`, a remote dataset directory (its `{split}.manifest.json`);
    /// 3. a directory — a dataset: `{dir}/{split}.manifest.json`, its shard list joined
    ///    to the directory, sample counts included;
    /// 4. an existing `*.manifest.json` file — the same, relative to its directory;
    /// 5. a spec containing `{` — a brace pattern ([`super::expand_braces`]);
    /// 6. a spec ending in `.tar` — one shard;
    /// 7. another existing file — a list file: one URL or pattern per line (blank lines
    ///    and `#` comments skipped), relative paths joined to the file's directory.
    pub fn resolve(spec: &str, opts: &SourceOptions) -> Result<Self> {
        let path = Path::new(spec);
        if spec.starts_with(PIPE_PREFIX) {
            return Self::from_urls(vec![spec.to_owned()], opts.allow_pipe);
        }
        let http = spec.starts_with("http://") || spec.starts_with("https://");
        if http && spec.ends_with('/') {
            let manifest = format!("{spec}{}", crate::format::manifest_name(&opts.split));
            return Self::from_remote_manifest(&manifest, opts);
        }
        if http && url_path_part(spec).ends_with(".manifest.json") {
            return Self::from_remote_manifest(spec, opts);
        }
        if spec.contains("://") {
            return Self::from_urls(super::expand_braces(spec)?, opts.allow_pipe);
        }
        if path.is_dir() {
            let manifest = path.join(crate::format::manifest_name(&opts.split));
            if !manifest.is_file() {
                return Err(Error::input(
                    path,
                    format!(
                        "a dataset directory needs {} (split `{}`)",
                        manifest.display(),
                        opts.split
                    ),
                ));
            }
            return Self::from_manifest(&manifest, opts.allow_pipe);
        }
        if spec.ends_with(".manifest.json") && path.is_file() {
            return Self::from_manifest(path, opts.allow_pipe);
        }
        if spec.contains('{') {
            return Self::from_urls(super::expand_braces(spec)?, opts.allow_pipe);
        }
        if spec.ends_with(".tar") {
            return Self::from_urls(vec![spec.to_owned()], opts.allow_pipe);
        }
        if path.is_file() {
            return Self::from_list_file(path, opts.allow_pipe);
        }
        Err(Error::input(
            path,
            "not a dataset directory, manifest, shard pattern, .tar shard, URL or list file",
        ))
    }

    /// The shards of a manifest, joined to its directory.
    pub fn from_manifest(path: &Path, allow_pipe: bool) -> Result<Self> {
        let manifest: Manifest = crate::format::read_json(path)?;
        let dir = path.parent().unwrap_or(Path::new(""));
        Self::of_manifest(&manifest, |u| join(dir, u), allow_pipe)
    }

    /// A manifest's shards with their sample counts, each URL through `locate`.
    fn of_manifest(
        manifest: &Manifest,
        locate: impl Fn(&str) -> String,
        allow_pipe: bool,
    ) -> Result<Self> {
        let shards: Vec<ShardSpec> = manifest
            .shardlist
            .iter()
            .map(|e| ShardSpec {
                url: locate(&e.url),
                nsamples: Some(e.nsamples),
            })
            .collect();
        refuse_pipes(&shards, allow_pipe)?;
        Ok(ShardList { shards })
    }

    /// The shards of a manifest at an `http(s)://` URL (fetched with `opts.http`'s
    /// retries and timeouts), relative entries joined to the URL's directory.
    pub fn from_remote_manifest(url: &str, opts: &SourceOptions) -> Result<Self> {
        opts.http.validate()?;
        let mut body = HttpOpener::from_options(&opts.http).open(url)?;
        let mut bytes = Vec::new();
        (&mut body)
            .take(MAX_REMOTE_MANIFEST)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(url, e))?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            path: PathBuf::from(url),
            source: e,
        })?;
        let located: Vec<String> = manifest
            .shardlist
            .iter()
            .map(|e| join_url(url, &e.url))
            .collect::<Result<_>>()?;
        let shards = located
            .into_iter()
            .zip(&manifest.shardlist)
            .map(|(url, e)| ShardSpec {
                url,
                nsamples: Some(e.nsamples),
            })
            .collect();
        Ok(ShardList { shards })
    }

    /// The shards named in a list file.
    pub fn from_list_file(path: &Path, allow_pipe: bool) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let dir = path.parent().unwrap_or(Path::new(""));
        let mut urls = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let expanded = if line.starts_with(PIPE_PREFIX) {
                vec![line.to_owned()]
            } else {
                super::expand_braces(line)
                    .map_err(|e| Error::input(path, format!("line {}: {e}", i + 1)))?
            };
            urls.extend(expanded.iter().map(|u| join(dir, u)));
        }
        Self::from_urls(urls, allow_pipe)
    }

    /// The shards in order.
    pub fn shards(&self) -> &[ShardSpec] {
        &self.shards
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Total samples when every count is known.
    pub fn total_samples(&self) -> Option<u64> {
        self.shards.iter().map(|s| s.nsamples).sum()
    }
}

/// Opens a shard URL as a byte stream. Implementations must be usable from several
/// threads (a prefetching reader may open ahead).
pub trait Opener: Send + Sync {
    /// Opens `url` for sequential reading.
    fn open(&self, url: &str) -> Result<Box<dyn Read + Send>>;

    /// The longest `url`'s reader may spend inside one call (an open, or one read of
    /// its body) retrying before it fails for good: the loader's stall watchdog waits at
    /// least this long. Zero where nothing is retried.
    fn retry_budget(&self, url: &str) -> std::time::Duration {
        let _ = url;
        std::time::Duration::ZERO
    }
}

/// Local files: plain paths and `file://` URLs.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileOpener;

impl Opener for FileOpener {
    fn open(&self, url: &str) -> Result<Box<dyn Read + Send>> {
        let path = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
        let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Box::new(BufReader::with_capacity(READ_BUFFER, f)))
    }
}

/// `pipe:CMD`: the standard output of `sh -c CMD` (standard error is inherited). A
/// non-zero exit status is reported as a read error at the end of the output; dropping
/// the reader early kills the command, so an abandoned pipe never lingers.
#[derive(Debug, Clone, Copy, Default)]
pub struct PipeOpener;

struct PipeReader {
    child: Child,
    stdout: BufReader<ChildStdout>,
    cmd: String,
    finished: bool,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.finished {
            return Ok(0);
        }
        let n = self.stdout.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.finished = true;
            let status = self.child.wait()?;
            if !status.success() {
                return Err(std::io::Error::other(format!(
                    "command `{}` failed: {status}",
                    self.cmd
                )));
            }
        }
        Ok(n)
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Opener for PipeOpener {
    fn open(&self, url: &str) -> Result<Box<dyn Read + Send>> {
        let cmd = url.strip_prefix(PIPE_PREFIX).unwrap_or(url).to_owned();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::io(PathBuf::from(url), e))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Config(format!("{url}: no standard output")))?;
        Ok(Box::new(PipeReader {
            child,
            stdout: BufReader::with_capacity(READ_BUFFER, stdout),
            cmd,
            finished: false,
        }))
    }
}

/// Dispatches on the URL form: files always, `pipe:` only when allowed, http(s)
/// through [`HttpOpener`].
#[derive(Debug, Clone, Default)]
pub struct DefaultOpener {
    /// Run `pipe:` commands.
    pub allow_pipe: bool,
    /// Opener for `http://` and `https://` URLs.
    pub http: HttpOpener,
}

impl DefaultOpener {
    /// An opener for `opts`: pipes as `allow_pipe` says, http with `opts.http`.
    pub fn from_options(opts: &SourceOptions) -> Self {
        DefaultOpener {
            allow_pipe: opts.allow_pipe,
            http: HttpOpener::from_options(&opts.http),
        }
    }

    /// An opener; `allow_pipe` enables `pipe:` URLs.
    pub fn new(allow_pipe: bool) -> Self {
        DefaultOpener {
            allow_pipe,
            http: HttpOpener::default(),
        }
    }
}

impl Opener for DefaultOpener {
    fn open(&self, url: &str) -> Result<Box<dyn Read + Send>> {
        if url.starts_with(PIPE_PREFIX) {
            if !self.allow_pipe {
                return Err(Error::Config(format!(
                    "shard `{url}` is a command; pipe: sources must be allowed explicitly \
                     (allow_pipe)"
                )));
            }
            return PipeOpener.open(url);
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return self.http.open(url);
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(Error::Config(format!("shard `{url}`: unknown URL scheme")));
        }
        FileOpener.open(url)
    }

    fn retry_budget(&self, url: &str) -> std::time::Duration {
        if url.starts_with("http://") || url.starts_with("https://") {
            self.http.retry_budget(url)
        } else {
            std::time::Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A remote manifest's entries resolve on its server; it may not name local files
    /// or commands; a query string (a presigned URL) is not part of the directory.
    #[test]
    fn remote_manifest_entries_resolve_on_its_server_only() {
        let m = "https://h.org:8443/d/in1k/train.manifest.json?sig=a/b";
        let j = |e: &str| join_url(m, e);
        assert_eq!(
            j("train-000.tar").unwrap(),
            "https://h.org:8443/d/in1k/train-000.tar"
        );
        assert_eq!(j("./x/a.tar").unwrap(), "https://h.org:8443/d/in1k/x/a.tar");
        assert_eq!(j("/abs/a.tar").unwrap(), "https://h.org:8443/abs/a.tar");
        assert_eq!(j("http://other/a.tar").unwrap(), "http://other/a.tar");
        for bad in ["pipe:cat /etc/passwd", "file:///etc/a.tar", "s3://b/a.tar"] {
            let e = j(bad).unwrap_err().to_string();
            assert!(
                e.contains(bad) && e.contains("only name shards over http"),
                "{e}"
            );
        }
        assert_eq!(
            url_path_part(m),
            "https://h.org:8443/d/in1k/train.manifest.json"
        );
    }
}
