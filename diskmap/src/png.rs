//! A map as a PNG: the SVG of [`crate::svg::render`] rasterised by resvg at
//! twice its size, its text set in the system's fonts (a monospace one when
//! there is one; text is left out where the system has no font at all).

use crate::DiskMap;

/// Why a PNG could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the PNG: {0}")]
pub struct PngError(String);

/// Pixels per SVG unit.
const SCALE: f32 = 2.0;

/// The picture as PNG bytes, and whether any font was found for its text.
pub fn render(map: &DiskMap) -> Result<(Vec<u8>, bool), PngError> {
    let svg = crate::svg::render(map);
    let mut opt = resvg::usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    let fonts = !opt.fontdb.is_empty();
    let tree = resvg::usvg::Tree::from_str(&svg, &opt).map_err(|e| PngError(e.to_string()))?;
    let size = tree.size();
    let (w, h) = (
        (size.width() * SCALE).ceil() as u32,
        (size.height() * SCALE).ceil() as u32,
    );
    let mut pixmap = resvg::tiny_skia::Pixmap::new(w, h).ok_or_else(|| PngError(format!("no {w}x{h} image")))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::from_scale(SCALE, SCALE),
        &mut pixmap.as_mut(),
    );
    let png = pixmap.encode_png().map_err(|e| PngError(e.to_string()))?;
    Ok((png, fonts))
}
