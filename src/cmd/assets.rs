//! `walsafe generate-assets DIR` (hidden): the man pages and shell
//! completions, generated from the command-line definitions so that they
//! never disagree with `--help`. `scripts/package.sh` runs it when it
//! builds the Debian package.
//!
//! - `DIR/man/walsafe.1`, and `walsafe-<command>.1` for every command;
//! - `DIR/completions/walsafe.bash`, `_walsafe` (zsh), `walsafe.fish`.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

pub fn generate(dir: &Path) -> anyhow::Result<()> {
    let mut cli = Cli::command();
    // Global options (--config, …) reach the subcommands' pages.
    cli.build();
    let man = dir.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    render(&cli, &man.join("walsafe.1"))?;
    for sub in cli
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("walsafe-{}", sub.get_name());
        let page = sub
            .clone()
            .name(name.clone())
            .bin_name(format!("walsafe {}", sub.get_name()));
        render(&page, &man.join(format!("{name}.1")))?;
    }
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)
        .with_context(|| format!("cannot create {}", completions.display()))?;
    for (shell, file) in [
        (Shell::Bash, "walsafe.bash"),
        (Shell::Zsh, "_walsafe"),
        (Shell::Fish, "walsafe.fish"),
    ] {
        let path = completions.join(file);
        let mut out = BufWriter::new(create(&path)?);
        clap_complete::generate(shell, &mut cli.clone(), "walsafe", &mut out);
    }
    Ok(())
}

fn render(cmd: &clap::Command, path: &Path) -> anyhow::Result<()> {
    let mut out = BufWriter::new(create(path)?);
    clap_mangen::Man::new(cmd.clone())
        .render(&mut out)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn create(path: &Path) -> anyhow::Result<File> {
    File::create(path).with_context(|| format!("cannot create {}", path.display()))
}
