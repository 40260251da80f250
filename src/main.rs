//! The `walsafe` binary; everything lives in the library.
fn main() -> std::process::ExitCode {
    std::process::ExitCode::FAILURE // WIP: cli lands with the orchestration modules
}
