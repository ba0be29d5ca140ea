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
