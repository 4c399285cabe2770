//! What a binary built without the `train` feature says when asked for a command that
//! needs libtorch (instead of clap's bare "unrecognized subcommand"). Shared by `conmim`
//! and `conmim-bench` (`#[path]` module).

/// The message for `BIN SUBCOMMAND` when SUBCOMMAND is one of `train_commands` and this
/// build lacks the `train` feature; `None` otherwise.
pub fn missing_train_feature(
    bin: &str,
    subcommand: &str,
    train_commands: &[&str],
) -> Option<String> {
    (!cfg!(feature = "train") && train_commands.contains(&subcommand)).then(|| {
        format!(
            "{bin}: error: `{bin} {subcommand}` needs the training build; this binary was \
             built without the `train` feature (no libtorch). Build one as the README's \
             Pretraining section says (source tools/env.sh; LIBTORCH_USE_PYTORCH=1 \
             PATH=$CONMIM_VENV/bin:$PATH cargo build --release --features train), or run \
             ./tools/run-demo.sh, which sets up and builds it."
        )
    })
}

/// `--help`'s epilogue: `examples`, and in a build without `train` which commands it
/// lacks and why.
pub fn after_help(examples: &str, train_commands: &[&str]) -> String {
    if cfg!(feature = "train") {
        examples.to_owned()
    } else {
        let what = match train_commands {
            [one] => format!("`{one}` command: it needs"),
            all => format!("training commands ({}): they need", all.join(", ")),
        };
        format!(
            "{examples}\n\nThis build has no {what} a build with --features train \
             (libtorch; README, Pretraining)."
        )
    }
}

/// In `main`, before parsing: exit 2 with the message when the first argument (or the
/// second, after `help`) is a training command this build lacks.
pub fn exit_if_missing(bin: &str, train_commands: &[&str]) {
    let args: Vec<String> = std::env::args().skip(1).take(2).collect();
    let sub = match args.as_slice() {
        [help, sub] if help == "help" => Some(sub),
        [sub, ..] => Some(sub),
        [] => None,
    };
    if let Some(msg) = sub.and_then(|sub| missing_train_feature(bin, sub, train_commands)) {
        eprintln!("{msg}");
        std::process::exit(2);
    }
}
