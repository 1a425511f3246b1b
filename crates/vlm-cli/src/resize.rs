//! `--max-image-edge`: the setting is refused up front in a build that cannot resize.

/// Refuses `--max-image-edge` in a build without `vlm-core`'s `resize` feature.
pub fn check_available(max_edge: Option<u32>) -> Result<(), crate::Failure> {
    if max_edge.is_some() && !cfg!(feature = "resize") {
        return Err(crate::Failure::usage(vlm_core::RESIZE_MISSING));
    }
    Ok(())
}
