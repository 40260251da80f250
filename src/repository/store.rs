//! (being written)

/// Checks that a repository URL has a supported scheme.
pub fn check_url(url: &str) -> Result<(), String> {
    let _ = url;
    Ok(())
}
