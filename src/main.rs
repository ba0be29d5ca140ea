//! The `orchestrate` binary: parse the arguments, run the command, turn its error into an exit code.
//! Everything else is in the library (`cli` decides what each command does).

use std::io::Write;

use clap::Parser;

fn main() {
    let cli = orchestrate::cli::Cli::parse();
    let result = orchestrate::cli::run(cli);
    // The supervisor's last console lines before anything else, and before the process ends.
    orchestrate::console::flush(std::time::Duration::from_secs(2));
    let code = match result {
        Ok(code) => code,
        // A closed stdout ends a command quietly (`orchestrate tasks | head`).
        Err(err) if orchestrate::error::output_closed(&err) => 0,
        Err(err) => {
            // Nowhere to say it if stderr is gone too: the exit code still does.
            let mut stderr = std::io::stderr().lock();
            let visible = |e: &dyn std::fmt::Display| {
                orchestrate::console::visible(&e.to_string()).into_owned()
            };
            let _ = writeln!(stderr, "error: {}", visible(&err));
            for cause in err.chain().skip(1) {
                let _ = writeln!(stderr, "  caused by: {}", visible(&cause));
            }
            orchestrate::error::exit_code(&err)
        }
    };
    std::process::exit(code);
}
