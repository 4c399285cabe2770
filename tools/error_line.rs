//! How the binaries print an error: its cause chain on one line, each cause once (no
//! backtrace for a user's mistake, whatever RUST_BACKTRACE says). Shared by `conmim`,
//! `conmim-shard` and `conmim-bench` (`#[path]` module).

/// An error's cause chain on one line, without repeating a cause its parent already
/// spelled out (`writing X: X.partial: No such file: No such file` was common).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}
