//! The `walsafe` binary; everything lives in the library.
fn main() -> std::process::ExitCode {
    walsafe::cmd::main()
}
