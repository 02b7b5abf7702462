//! Where each cell of a map goes: how many bytes a cell holds, and the cell's
//! column and row in a grid (row-major, offset 0 at the top left) or along a
//! Hilbert curve (nearby offsets stay nearby on the picture).

use serde::{Deserialize, Serialize};

/// How the cells are laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Rows of cells, read like text: offset 0 at the top left.
    #[default]
    Grid,
    /// A Hilbert curve over a square: a run of the disk stays a compact blob.
    Hilbert,
}

impl std::str::FromStr for Layout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "grid" => Ok(Layout::Grid),
            "hilbert" => Ok(Layout::Hilbert),
            _ => Err(format!("unknown layout {s:?}: give grid or hilbert")),
        }
    }
}

/// How large a map may be: at most `max_cells` cells, `columns` per row
/// in a grid (a Hilbert square takes the largest power-of-two side that fits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// The layout.
    pub layout: Layout,
    /// Most cells (at least 1, at most [`MAX_CELLS`]).
    pub max_cells: u32,
    /// Cells per row of a grid (at least 1).
    pub columns: u32,
}

/// The most cells a map has.
pub const MAX_CELLS: u32 = 1 << 16;

impl Shape {
    /// A picture: up to 64 x 64 cells.
    pub const PICTURE: Shape = Shape {
        layout: Layout::Grid,
        max_cells: 4096,
        columns: 64,
    };
    /// A terminal: up to 64 x 16 cells (8 lines of half blocks).
    pub const TERMINAL: Shape = Shape {
        layout: Layout::Grid,
        max_cells: 1024,
        columns: 64,
    };

    /// The same shape with another layout.
    pub fn with_layout(self, layout: Layout) -> Shape {
        Shape { layout, ..self }
    }
}

/// The cells of one map: each holds `cell_bytes` (a power-of-two number of
/// tracking blocks), the last one maybe fewer; `cells` of them cover the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    /// The layout.
    pub layout: Layout,
    /// Columns of the picture.
    pub columns: u32,
    /// Rows of the picture.
    pub rows: u32,
    /// Bytes per cell.
    pub cell_bytes: u64,
    /// Cells covering the disk (at most `columns * rows`).
    pub cells: u32,
}

impl Geometry {
    /// The geometry of a disk of `capacity` bytes tracked in blocks of
    /// `granularity` bytes (a power of two), within `shape`.
    ///
    /// # Panics
    /// If `granularity` is not a power of two or `capacity` is 0.
    pub fn new(capacity: u64, granularity: u64, shape: Shape) -> Geometry {
        assert!(granularity.is_power_of_two() && capacity > 0);
        let max_cells = u64::from(shape.max_cells.clamp(1, MAX_CELLS));
        let target = match shape.layout {
            Layout::Grid => max_cells,
            // The largest power-of-two square that fits.
            Layout::Hilbert => {
                let mut side = 1u64;
                while (side * 2) * (side * 2) <= max_cells {
                    side *= 2;
                }
                side * side
            }
        };
        let blocks = capacity.div_ceil(granularity);
        let per_cell = blocks.div_ceil(target).next_power_of_two();
        let cell_bytes = per_cell.saturating_mul(granularity);
        let cells = capacity.div_ceil(cell_bytes) as u32;
        let (columns, rows) = match shape.layout {
            Layout::Grid => {
                let columns = shape.columns.max(1).min(cells);
                (columns, cells.div_ceil(columns))
            }
            Layout::Hilbert => {
                let mut side = 1u32;
                while side * side < cells {
                    side *= 2;
                }
                (side, side)
            }
        };
        Geometry {
            layout: shape.layout,
            columns,
            rows,
            cell_bytes,
            cells,
        }
    }

    /// The cell holding byte `offset`.
    pub fn cell_of(&self, offset: u64) -> u32 {
        ((offset / self.cell_bytes) as u32).min(self.cells.saturating_sub(1))
    }

    /// Column and row of cell `i`.
    pub fn xy(&self, i: u32) -> (u32, u32) {
        match self.layout {
            Layout::Grid => (i % self.columns, i / self.columns),
            Layout::Hilbert => hilbert_xy(self.columns, i),
        }
    }

    /// The cell at column `x`, row `y`, if it covers part of the disk.
    pub fn at(&self, x: u32, y: u32) -> Option<u32> {
        if x >= self.columns || y >= self.rows {
            return None;
        }
        let i = match self.layout {
            Layout::Grid => y * self.columns + x,
            Layout::Hilbert => hilbert_index(self.columns, x, y),
        };
        (i < self.cells).then_some(i)
    }
}

/// Column and row of position `d` along the Hilbert curve over a square of
/// side `n` (a power of two).
pub fn hilbert_xy(n: u32, d: u32) -> (u32, u32) {
    let (mut x, mut y) = (0u32, 0u32);
    let mut t = d;
    let mut s = 1u32;
    while s < n {
        let rx = 1 & (t / 2);
        let ry = 1 & (t ^ rx);
        rotate(s, &mut x, &mut y, rx, ry);
        x += s * rx;
        y += s * ry;
        t /= 4;
        s *= 2;
    }
    (x, y)
}

/// Position along the Hilbert curve of column `x`, row `y` (the inverse of
/// [`hilbert_xy`]).
pub fn hilbert_index(n: u32, x: u32, y: u32) -> u32 {
    let (mut x, mut y) = (x, y);
    let mut d = 0u32;
    let mut s = n / 2;
    while s > 0 {
        let rx = u32::from(x & s > 0);
        let ry = u32::from(y & s > 0);
        d += s * s * ((3 * rx) ^ ry);
        rotate(n, &mut x, &mut y, rx, ry);
        s /= 2;
    }
    d
}

/// Turns a quadrant so the curve's pieces join.
fn rotate(n: u32, x: &mut u32, y: &mut u32, rx: u32, ry: u32) {
    if ry == 0 {
        if rx == 1 {
            *x = n - 1 - *x;
            *y = n - 1 - *y;
        }
        std::mem::swap(x, y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hilbert_is_a_bijection_whose_steps_are_neighbours() {
        for n in [1u32, 2, 4, 8, 64] {
            let mut seen = std::collections::HashSet::new();
            let mut last: Option<(u32, u32)> = None;
            for d in 0..n * n {
                let (x, y) = hilbert_xy(n, d);
                assert!(x < n && y < n);
                assert!(seen.insert((x, y)), "n {n} d {d} revisits ({x}, {y})");
                assert_eq!(hilbert_index(n, x, y), d);
                if let Some((lx, ly)) = last {
                    assert_eq!(lx.abs_diff(x) + ly.abs_diff(y), 1, "n {n} d {d}");
                }
                last = Some((x, y));
            }
        }
    }

    #[test]
    fn cells_are_whole_blocks_and_cover_the_disk() {
        let gib = 1u64 << 30;
        let g = Geometry::new(gib, 65536, Shape::PICTURE);
        assert_eq!((g.cell_bytes, g.cells, g.columns, g.rows), (256 << 10, 4096, 64, 64));
        // 62 TiB: 16 GiB cells, 3968 of them, 62 rows.
        let g = Geometry::new(62 << 40, 65536, Shape::PICTURE);
        assert_eq!((g.cell_bytes, g.cells, g.rows), (16 * gib, 3968, 62));
        assert_eq!(g.cell_of((62 << 40) - 1), 3967);
        // A tiny disk: one cell per block.
        let g = Geometry::new(1 << 20, 65536, Shape::PICTURE);
        assert_eq!((g.cell_bytes, g.cells, g.columns, g.rows), (65536, 16, 16, 1));
        // An odd size: the last cell is partial.
        let g = Geometry::new(gib + 512, 65536, Shape::TERMINAL);
        assert_eq!(g.cell_bytes, 2 << 20);
        assert_eq!(g.cells, 513);
        assert_eq!(g.rows, 9);
        let h = Geometry::new(gib, 65536, Shape::PICTURE.with_layout(Layout::Hilbert));
        assert_eq!((h.columns, h.rows, h.cells), (64, 64, 4096));
        let h = Geometry::new(gib + 512, 65536, Shape::TERMINAL.with_layout(Layout::Hilbert));
        assert_eq!((h.columns, h.cells), (32, 513));
        for i in 0..h.cells {
            let (x, y) = h.xy(i);
            assert_eq!(h.at(x, y), Some(i));
        }
        // Cells past the disk's end have no index.
        let unused = (0..32 * 32).filter(|&d| d >= h.cells).count();
        let missing = (0..32)
            .flat_map(|y| (0..32).map(move |x| (x, y)))
            .filter(|&(x, y)| h.at(x, y).is_none())
            .count();
        assert_eq!(unused, missing);
    }
}
