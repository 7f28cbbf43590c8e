//! What the examples share. Their command lines are parsed by hand, and `--help` and
//! usage errors end every example the same way: [`parse_args`].

use std::process::ExitCode;

/// The options `parse` reads from the program's arguments; or, after printing the usage,
/// the exit status for `--help` (`parse` fails with an empty message: 0) or for a usage
/// error (2, the message printed before the usage).
pub fn parse_args<T>(
    program: &str,
    usage: &str,
    parse: impl FnOnce(std::iter::Skip<std::env::Args>) -> Result<T, String>,
) -> Result<T, ExitCode> {
    match parse(std::env::args().skip(1)) {
        Ok(options) => Ok(options),
        Err(e) if e.is_empty() => {
            println!("{usage}");
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{program}: {e}\n{usage}");
            Err(ExitCode::from(2))
        }
    }
}
