//! The `orchestrate` binary: parse the arguments, run the command, turn its error into an exit code.
//! Everything else is in the library (`cli` decides what each command does).

use clap::Parser;

fn main() {
    let cli = orchestrate::cli::Cli::parse();
    let code = match orchestrate::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            orchestrate::error::exit_code(&err)
        }
    };
    std::process::exit(code);
}
